"""Clean stops and sends on their own schedule, with the real node process.

* SIGTERM while a series is being segmented: the node exits within
  ``node.shutdown_seconds`` (plus 5 s), logs no traceback, and the job it handed back
  runs at the next start (exactly one SEG).
* kill -9 of the node: its model process is gone 5 s later (checked by pid).
* a due send is attempted on time while another series is being segmented.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import datetime

import pytest

from dicom_node.store.state import JobState
from tests.derived import copy_series
from tests.support.asserts import assert_exactly_one_seg, series_uid_of
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcess, node_fixture
from tests.support.wait import process_alive, wait_until

pytestmark = pytest.mark.peers

node = node_fixture(
    node={"shutdown_seconds": 5},
    send={"max_attempts": 30, "retry_delay_seconds": 1, "timeout_seconds": 5},
)


def _model_pid(node: NodeProcess) -> int:
    found = re.search(r"model runner started \(pid (\d+)\)", node.log())
    return int(found.group(1)) if found else 0


@pytest.mark.e2e
def test_sigterm_while_segmenting_exits_in_time_without_traceback(node, pacs, mri_dir):
    series = mri_dir / "t1_philips_3t_mprage_sag"  # 170 slices: the model runs for a while
    node.start()
    pacs.start()
    storescu(node.port, series)
    wait_until(lambda: "processing series" in node.log(), 120, 0.05, "processing to start")
    started = time.monotonic()
    code = node.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - started
    assert code == 0
    assert took < 5 + 5, f"the node took {took:.1f}s to stop (shutdown_seconds 5)"
    assert "Traceback" not in node.log() and "closed database" not in node.log()
    pid = _model_pid(node)
    assert pid and not process_alive(pid), "the model process stopped with the node"
    job = node.jobs()[0]
    assert job.state in (JobState.PROCESSING, JobState.SENT), job.state  # handed back, or it had finished
    node.start()
    wait_until(lambda: node.jobs()[0].state is JobState.SENT, 300, 0.5, "the SEG after the restart")
    pacs.settle()
    assert_exactly_one_seg(pacs, series_uid_of(series))


def test_the_model_process_dies_with_a_killed_node(node):
    node.start()
    pid = wait_until(lambda: _model_pid(node), 60, 0.05, "the model runner to start")
    assert process_alive(pid)
    node.stop(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(pid), f"model process {pid} still alive 5s after kill -9 of the node"


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")


def _events(log: str) -> list[tuple[float, str]]:
    events = []
    for line in log.splitlines():
        match = _LINE.match(line)
        if match:
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((at, match.group(2)))
    return events


@pytest.mark.e2e
def test_a_due_send_is_attempted_on_time_while_another_series_is_segmented(node, pacs, mri_dir, tmp_path):
    small = copy_series(mri_dir / "t1_siemens_3t_fl2d_sag_hfs", tmp_path / "small", seed=f"due-{tmp_path.name}")
    node.start()  # the destination is down: pacs is not started
    storescu(node.port, small)
    wait_until(lambda: "job 1: seg to pacs: send attempt 1 failed" in node.log(), 300, 0.1, "the first failed send")
    storescu(node.port, mri_dir / "t1_philips_3t_mprage_sag")  # a long segmentation
    wait_until(lambda: "job 2: made" in node.log() or "job 2: failed" in node.log(), 600, 0.2, "job 2 to end")
    events = _events(node.log())
    begin = next(at for at, text in events if text.startswith("job 2: processing series"))
    end = next(at for at, text in events if text.startswith("job 2: made") or text.startswith("job 2: failed"))
    failures = [(at, text) for at, text in events if text.startswith("job 1: seg to pacs: send attempt")]
    lateness = []
    for (at, text), (next_at, _) in zip(failures, failures[1:]):
        due = at + float(re.search(r"next in (\d+)s", text).group(1))
        if begin <= due <= end:
            lateness.append(next_at - due)
    assert lateness, f"no send fell due during the segmentation ({begin:.0f}..{end:.0f}): {failures}"
    assert max(lateness) < 2.0, f"sends ran late behind the segmentation: {lateness}"
    assert "connection refused" in failures[0][1]
    pacs.start()
    wait_until(lambda: node.jobs()[0].state is JobState.SENT, 120, 0.2, "the SEG once the PACS is up")
    pacs.settle()
    assert_exactly_one_seg(pacs, series_uid_of(tmp_path / "small"))
