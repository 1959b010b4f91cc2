"""The operator's details (issue 25, point 6): a closed pipe ends every command quietly,
``process`` lists every object it wrote, ``rules test`` runs the series checks that need
no model, ``dicom-node echo`` and the echo at start (``/readyz``), ``status`` words that
say what they count, model timings that add up, and pynetdicom's own lines kept out of
the log of a failed send. (Config errors in the README's form: ``tests/test_config.py``.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import yaml

from dicom_node.store.state import JobState, SeriesRef, StateStore
from tests.support.dcmtk import StoreSCP
from tests.support.node import NodeProcess, node_config
from tests.support.orthanc import Orthanc
from tests.support.paths import LOCALHOST, REPO, free_port
from tests.support.wait import wait_until

FOUR = ["seg", "rtstruct", "overlay", "report"]


def _config(folder: Path, destinations: list[dict], **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({
        "destinations": destinations,
        "storage": {"spool_dir": str(folder / "spool"), "state_db": str(folder / "state.sqlite3")},
        **sections,
    }))
    return path


def _dicom_node(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# -- a closed pipe ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    "rules test INPUT", "weights list", "status", "echo", "cleanup --dry-run", "--help",
])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(command, t1_dir, tmp_path):
    """The read end is closed before the command writes anything, so that its first write
    meets a closed pipe for sure (as after `| head -1` has read its line)."""
    config = _config(tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": LOCALHOST, "port": free_port()}],
                     models=[{"name": "total", "weights_dir": str(tmp_path / "weights")}])
    args = command.replace("INPUT", str(t1_dir)).split()
    if command != "--help":
        args += ["--config", str(config)]
    process = subprocess.Popen([sys.executable, "-m", "dicom_node", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert stderr == "", stderr
    assert code == 0, "a reader that stopped early is no failure (echo's closed port is not even reported)"


# -- process ---------------------------------------------------------------------------------

@pytest.mark.e2e
def test_process_lists_every_object_it_wrote(phantom_weights, t1_dir, tmp_path):
    config = _config(tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": LOCALHOST, "port": 104,
                                 "outputs": FOUR}],
                     models=[{"name": "total", "weights_dir": str(phantom_weights), "home_dir": str(tmp_path / "home")}])
    result = _dicom_node("process", str(t1_dir), "--output", str(tmp_path / "out"), "--config", str(config),
                         timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    wrote = [line.split("  wrote ", 1)[1] for line in result.stdout.splitlines() if line.startswith("  wrote ")]
    assert [line.split(":", 1)[0] for line in wrote] == FOUR
    paths = [Path(line.split(": ", 1)[1]) for line in wrote]
    assert all(path.exists() for path in paths), paths
    assert sorted(paths) == sorted((tmp_path / "out").iterdir()), "every object written is listed, and only those"


# -- rules test ------------------------------------------------------------------------------

def _without_a_middle_slice(t1_dir: Path, out: Path) -> Path:
    """A copy of the T1 series under new UIDs, less the slice in the middle of the stack."""
    from tests.derived import copy_series

    paths = copy_series(t1_dir, out, seed="rules-test-missing-slice")
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in paths}
    orientation = np.array(headers[paths[0]].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    ordered = sorted(paths, key=lambda path: float(np.dot(normal, np.array(headers[path].ImagePositionPatient,
                                                                            dtype=float))))
    ordered[len(ordered) // 2].unlink()
    return out


def test_rules_test_says_a_series_with_a_missing_slice_would_fail(t1_dir, tmp_path):
    config = _config(tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": LOCALHOST, "port": 104}])
    whole = _dicom_node("rules", "test", str(t1_dir), "--config", str(config))
    assert whole.returncode == 0, whole.stderr
    assert "  model default: runs, preprocessing" in whole.stdout
    assert "decision: fail" not in whole.stdout

    gap = _dicom_node("rules", "test", str(_without_a_middle_slice(t1_dir, tmp_path / "gap")), "--config",
                      str(config))
    assert gap.returncode == 0, gap.stderr
    assert "decision: fail: the series is not whole: a gap of" in gap.stdout
    assert "about 1 slice(s) missing" in gap.stdout
    assert ": runs" not in gap.stdout


# -- echo ------------------------------------------------------------------------------------

@pytest.mark.peers
def test_echo_reaches_orthanc_over_dimse_and_dicomweb_and_storescp_and_names_a_closed_port(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", node_port=free_port(), dicomweb=True).start()
    storescp = StoreSCP(tmp_path / "pacs").start()
    closed = free_port()
    try:
        config = _config(tmp_path / "node", [
            {"name": "orthanc", "ae_title": orthanc.ae_title, "host": LOCALHOST, "port": orthanc.dicom_port},
            {"name": "web", "protocol": "dicomweb", "url": orthanc.dicomweb_url},
            {"name": "storescp", "ae_title": storescp.ae_title, "host": LOCALHOST, "port": storescp.port},
            {"name": "gone", "ae_title": "GONE", "host": LOCALHOST, "port": closed},
        ])
        every = _dicom_node("echo", "--config", str(config))
        lines = every.stdout.splitlines()
        assert every.returncode == 1, every.stdout + every.stderr
        assert every.stderr == "", "pynetdicom's own lines stay out"
        assert len(lines) == 4, lines
        assert lines[0].startswith(f"orthanc (ORTHANC@{LOCALHOST}:{orthanc.dicom_port}): ok: C-ECHO answered success")
        assert lines[1].startswith(f"web ({orthanc.dicomweb_url}): ok: QIDO-RS answered HTTP 200")
        assert lines[2].startswith(f"storescp (PACS@{LOCALHOST}:{storescp.port}): ok: C-ECHO answered success")
        assert lines[3].startswith(f"gone (GONE@{LOCALHOST}:{closed}): FAILED: ")
        assert "connection refused (nothing listens there)" in lines[3]

        one = _dicom_node("echo", "--destination", "storescp", "--config", str(config))
        assert (one.returncode, len(one.stdout.splitlines())) == (0, 1), one.stdout + one.stderr
        unknown = _dicom_node("echo", "--destination", "nowhere", "--config", str(config))
        assert unknown.returncode == 2 and "no destination 'nowhere'" in unknown.stderr
    finally:
        storescp.stop()
        orthanc.stop()


@pytest.mark.peers
def test_readyz_names_a_destination_that_has_not_answered_until_it_does(tmp_path):
    pacs_port = free_port()
    config = node_config(tmp_path / "node", destination=("PACS", pacs_port), weights_dir=tmp_path / "weights",
                         http={"port": free_port()})
    node = NodeProcess(tmp_path / "node", config).start()
    storescp = StoreSCP(tmp_path / "pacs", port=pacs_port)
    ready = f"http://{LOCALHOST}:{config['http']['port']}/readyz"
    try:
        def failing() -> dict:
            return requests.get(ready, timeout=10).json()["failing"]

        wait_until(lambda: "last check" in failing().get("echo:pacs", ""), 30, 0.2, "the failed echo")
        down = failing()
        assert "connection refused" in down["echo:pacs"], down
        wait_until(lambda: "destination pacs (PACS@" in node.log() and "FAILED" in node.log(), 10, 0.2,
                   "the failed echo in the log")
        storescp.start()
        wait_until(lambda: "echo:pacs" not in failing(), 30, 0.5, "the echo answered")
        assert "C-ECHO answered success" in node.log()
        assert "pynetdicom" not in node.log(), "a refused connection is the node's line only"
    finally:
        node.stop(signal.SIGKILL)
        storescp.stop()


# -- status ----------------------------------------------------------------------------------

def test_status_says_what_attempts_count_and_a_reprocessed_job_is_queued_from_its_reprocessing(tmp_path):
    from dicom_node.cli.jobs import _status_lines, _timeline

    state = StateStore(tmp_path / "s.db")
    ref = SeriesRef("1.2.3", "1.2.3.1", "MODALITY", tmp_path)
    state.record_instance(ref, "1.2.3.1.1", "1.2", tmp_path / "a", now=100)
    job = state.complete_series("1.2.3.1", now=110)
    state.claim_next_processing(now=111)
    state.start_sending(job, [("pacs", "seg", tmp_path), ("pacs", "overlay", tmp_path),
                              ("archive", "seg", tmp_path)], now=120)
    items = state.outbox(job)
    for item in items:
        state.record_send(item.id, ok=True, now=121)
    lines = _status_lines(state.jobs(), False, 200, state.outboxes())
    assert "3 of 3 object(s) delivered in 3 send attempt(s)" in lines[1], lines[1]
    assert " attempts 3" not in lines[1]

    again = state.reprocess(job, now=5000)
    state.claim_next_processing(now=5004)
    reprocessed = state.job(again.id)
    assert reprocessed.completed_at == 110, "the series' completion stays the original's"
    assert reprocessed.stage_seconds()["queued"] == 4.0
    timeline = _timeline(reprocessed)
    assert "queued again 1970-01-01 01:23:20" in timeline and "(queued 4.0s)" in timeline, timeline
    assert "queued again" not in _timeline(state.job(job)), "a job queued at its completion says nothing more"
    state.close()


def test_a_failed_job_queued_again_counts_its_queue_time_from_the_retry(tmp_path):
    state = StateStore(tmp_path / "s.db")
    ref = SeriesRef("1.2.3", "1.2.3.1", "MODALITY", tmp_path)
    state.record_instance(ref, "1.2.3.1.1", "1.2", tmp_path / "a", now=100)
    job = state.complete_series("1.2.3.1", now=110)
    state.claim_next_processing(now=111)
    from dicom_node.store.state import JobUpdate

    state.update_job(job, JobState.FAILED, JobUpdate(reason="the model failed"), now=150)
    state.requeue(job, now=900)
    state.claim_next_processing(now=902)
    assert state.job(job).stage_seconds()["queued"] == 2.0, "not 791 s from its first queuing"
    state.close()


# -- model timings ---------------------------------------------------------------------------

@pytest.mark.e2e
def test_model_timings_name_each_part_and_add_up_to_the_time_of_the_call(phantom_weights, t1_dir, tmp_path):
    from dicom_node.config import parse_config
    from dicom_node.work.processor import ModelRun
    from pipeline.model.runner import ModelRunner
    from pipeline.model.segment import make_segmenter
    from pipeline.process import Outcome, process_series

    config = parse_config({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": LOCALHOST, "port": 104, "outputs": FOUR}],
        "models": [{"name": "total", "weights_dir": str(phantom_weights), "home_dir": str(tmp_path / "home")}],
    }, tmp_path)
    settings = config.pipeline_for("total")
    with ModelRunner(settings.model) as runner:
        segmenter = make_segmenter(settings.model, runner)
        started = time.perf_counter()
        result = process_series(sorted(t1_dir.glob("*.dcm")), settings, segmenter, config.output_requests)
        total = time.perf_counter() - started
    assert result.outcome is Outcome.SEG
    parts = result.timing
    assert list(parts) == ["load", "read", "preprocess", "nnunet_preprocess", "forward", "export", "model_other",
                           "handover", "encode"]
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert parts["load"] > 0 and parts["forward"] > 0, "a cold model process: loaded, then run"
    assert abs(sum(parts.values()) - total) <= 0.05 * total + 0.2, (parts, total)
    line = ModelRun("total", result.reason, result).timing
    assert all(f"{name} " in line for name in parts), line


# -- pynetdicom's own lines ------------------------------------------------------------------

_FAILED_SEND = """
import logging, sys
from dicom_node.config import Destination
from dicom_node.errors import SendError
from dicom_node.logs import setup_logging
from dicom_node.send.dimse import send_file
setup_logging(sys.argv[2])
try:
    send_file(sys.argv[3], Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=int(sys.argv[1])),
              calling_ae_title="DICOMNODE", timeout=5)
except SendError as exc:
    logging.getLogger("dicom_node.work.processor").warning("send failed: %s", exc)
"""


@pytest.mark.parametrize("level, pynetdicom_lines", [("INFO", False), ("DEBUG", True)])
def test_a_failed_send_logs_the_nodes_one_line_and_pynetdicoms_only_at_debug(level, pynetdicom_lines, t1_dir):
    path = sorted(t1_dir.glob("*.dcm"))[0]
    result = subprocess.run([sys.executable, "-c", _FAILED_SEND, str(free_port()), level, str(path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = result.stderr.splitlines()
    ours = [line for line in lines if "dicom_node.work.processor: send failed" in line]
    assert len(ours) == 1 and "connection refused" in ours[0], result.stderr
    theirs = [line for line in lines if "pynetdicom" in line]
    if pynetdicom_lines:
        assert any("ERROR pynetdicom" in line for line in theirs), result.stderr  # the switch does something
    else:
        assert theirs == [] and len([line for line in lines if " ERROR " in line or " WARNING " in line]) == 1, lines
