"""Every way a PACS can say no to the SEG, with the node as a subprocess and a scripted
pynetdicom storage SCP as destination. Each case ends as the worker documents it
(failed at once, retried, or sent with the warning recorded), the reason names the
cause with the DICOM status in hex, and the next series still gets its SEG."""

from __future__ import annotations

import shutil

import pytest

from dicom_node.store.state import JobState
from tests.derived import copy_series
from tests.scripted_pacs import ScriptedPACS
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcess, node_fixture
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.peers]


@pytest.fixture
def pacs():
    server = ScriptedPACS().start()
    yield server
    server.stop()


node = node_fixture(
    completion={"stable_seconds": 2},
    send={"max_attempts": 4, "retry_delay_seconds": 1, "timeout_seconds": 3},
)


def _deliver(node: NodeProcess, t1_dir, tmp_path, name: str) -> str:
    """A fresh copy of the T1 series sent to the node; returns its SeriesInstanceUID."""
    import pydicom

    files = copy_series(t1_dir, tmp_path / name, name)
    storescu(node.port, files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _ended(node: NodeProcess, series_uid: str):
    def done():
        jobs = [j for j in node.jobs() if j.series.series_instance_uid == series_uid]
        return jobs[-1] if jobs and jobs[-1].state in (JobState.SENT, JobState.FAILED) else None
    return wait_until(done, 300, 0.5, f"the job of {series_uid} to end")


def test_each_pacs_answer_ends_as_documented_and_the_next_series_gets_its_seg(node, pacs, t1_dir, tmp_path):
    node.start()

    pacs.set("refuse")  # no presentation context for SEG: permanent, failed at once
    refused = _ended(node, _deliver(node, t1_dir, tmp_path, "refused"))
    assert refused.state is JobState.FAILED and refused.attempts == 1
    assert "presentation context rejected (abstract syntax (SOP class) not supported)" in refused.reason
    assert "not retried" in refused.reason and "Segmentation Storage" in refused.reason
    pacs.set("accept")

    pacs.set("status", 0xA700)  # out of resources: transient, retried
    series = _deliver(node, t1_dir, tmp_path, "out_of_resources")
    job = _ended(node, series)
    assert job.state is JobState.SENT and job.attempts == 2
    assert "0xA700 (Refused: Out of Resources)" in job.last_error
    assert len(pacs.received(series)) == 1

    pacs.set("status", 0xB000)  # a warning: sent, the warning recorded
    series = _deliver(node, t1_dir, tmp_path, "warning")
    job = _ended(node, series)
    assert job.state is JobState.SENT and job.attempts == 1
    assert "sent with warning 0xB000 (Coercion of Data Elements)" in job.reason
    assert len(pacs.received(series)) == 1

    pacs.set("status", 0xA900)  # data set does not match the SOP class: permanent
    job = _ended(node, _deliver(node, t1_dir, tmp_path, "mismatch"))
    assert job.state is JobState.FAILED and job.attempts == 1
    assert "0xA900 (Data Set Does Not Match SOP Class)" in job.reason
    pacs.set("accept")

    pacs.set("abort")  # the association aborted mid-operation: retried
    series = _deliver(node, t1_dir, tmp_path, "aborted")
    job = _ended(node, series)
    assert job.state is JobState.SENT and job.attempts == 2 and "aborted" in job.last_error
    assert len(pacs.received(series)) == 1

    pacs.set("stall")  # no answer within send.timeout_seconds: retried
    series = _deliver(node, t1_dir, tmp_path, "stalled")
    job = _ended(node, series)
    assert job.state is JobState.SENT and job.attempts == 2 and "timed out" in job.last_error
    assert len(pacs.received(series)) == 1

    # a results folder that cannot be written fails that job; the next series is processed
    results = node.folder / "spool" / "results"
    shutil.rmtree(results)
    results.write_text("not a folder")
    job = _ended(node, _deliver(node, t1_dir, tmp_path, "unwritable"))
    assert job.state is JobState.FAILED and "cannot save the results into the spool" in job.reason
    results.unlink()
    results.mkdir()
    series = _deliver(node, t1_dir, tmp_path, "after")
    assert _ended(node, series).state is JobState.SENT
    assert len(pacs.received(series)) == 1

    assert node.process.poll() is None
    assert sorted(pacs.applied) == sorted(
        ["accept"] * 4 + ["status"] * 3 + ["abort", "stall"]
    ), pacs.applied  # refused: no C-STORE ever reached the PACS
