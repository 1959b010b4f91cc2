"""The node end to end, with real peers: Orthanc and dcmtk as PACS, the phantom model
run through TotalSegmentator's real API, dciodvfy and highdicom to check the SEG."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.state import JobState, StateStore
from tests.peers import REPO, NodeProcess, node_config, storescu, wait_until
from tests.segcheck import check_seg_against_source

PATIENT_STRINGS = ("crlab", "HFS^", "d2n_Philips")  # the test data's patient names and IDs


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def assert_log_is_private(node: NodeProcess) -> None:
    log = node.log()
    for secret in PATIENT_STRINGS:
        assert secret not in log, f"the node's log contains patient data ({secret!r})"


@pytest.fixture
def make_node(tmp_path: Path):
    nodes: list[NodeProcess] = []

    def make(destination: tuple[str, int], weights_dir: Path, port: int | None = None, **overrides) -> NodeProcess:
        config = node_config(tmp_path / "node", destination=destination, weights_dir=weights_dir, **overrides)
        if port is not None:
            config["node"]["port"] = port
        node = NodeProcess(tmp_path / "node", config)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.process is not None:
            node.stop(signal.SIGKILL)


def _jobs(node: NodeProcess) -> list:
    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        return state.jobs()
    finally:
        state.close()


def test_orthanc_round_trip(orthanc, node_port, make_node, phantom_weights, t1_dir):
    node = make_node((orthanc.ae_title, orthanc.dicom_port), phantom_weights, port=node_port).start()
    series_ids = orthanc.upload(t1_dir)
    assert len(series_ids) == 1
    study_id = orthanc.get(f"/series/{series_ids[0]}")["ParentStudy"]
    orthanc.post("/modalities/node/store", {"Resources": series_ids, "Synchronous": True})

    def seg_instance():
        for series in orthanc.get(f"/studies/{study_id}/series"):
            if series["MainDicomTags"].get("Modality") == "SEG":
                return series["Instances"]
        return None

    instances = wait_until(seg_instance, 300, 1, "a SEG in the study on Orthanc")
    assert len(instances) == 1
    path = Path(node.folder) / "from_orthanc.dcm"
    path.write_bytes(orthanc.get_bytes(f"/instances/{instances[0]}/file"))
    seg = check_seg_against_source(path, t1_dir)
    assert seg.SeriesDescription.startswith("Auto SEG")
    assert [job.state for job in _jobs(node)] == [JobState.SENT]
    assert_log_is_private(node)


def test_storescu_to_node_to_storescp(storescp, make_node, phantom_weights, t1_dir):
    node = make_node((storescp.ae_title, storescp.port), phantom_weights).start()
    storescu(node.port, t1_dir)
    received = wait_until(storescp.received, 300, 1, "the SEG at storescp")
    assert len(received) == 1
    check_seg_against_source(received[0], t1_dir)
    assert dciodvfy_errors(received[0]) == []
    assert_log_is_private(node)


def test_sigterm_before_completion_then_restart_still_sends_the_seg(storescp, make_node, phantom_weights, t1_dir):
    node = make_node(
        (storescp.ae_title, storescp.port),
        phantom_weights,
        completion={"stable_seconds": 8, "complete_on_release": False},
    ).start()
    storescu(node.port, t1_dir)
    assert node.stop(signal.SIGTERM) == 0
    assert _jobs(node) == [], "the series must not have completed before the stop"
    node.start()
    received = wait_until(storescp.received, 300, 1, "the SEG after the restart")
    check_seg_against_source(received[0], t1_dir)
    assert [job.state for job in _jobs(node)] == [JobState.SENT]


def test_missing_weights_fail_with_the_path_then_retry_succeeds(storescp, make_node, phantom_weights, t1_dir, tmp_path):
    weights = tmp_path / "empty_weights"
    node = make_node((storescp.ae_title, storescp.port), weights).start()
    storescu(node.port, t1_dir)
    jobs = wait_until(lambda: [j for j in _jobs(node) if j.state is JobState.FAILED], 120, 0.5, "the failed job")
    assert str(weights / "Dataset297_TotalSegmentator_total_3mm_1559subj") in jobs[0].reason
    assert "weights_dir" in jobs[0].reason
    assert len(list(jobs[0].series.folder.glob("*.dcm"))) == 35, "the received series stays on disk"
    status = node.cli("status")
    assert "failed: 1" in status.stdout and "missing" in status.stdout

    shutil.copytree(phantom_weights, weights, dirs_exist_ok=True)
    retry = node.cli("retry", str(jobs[0].id))
    assert retry.returncode == 0, retry.stderr
    received = wait_until(storescp.received, 300, 1, "the SEG after the retry")
    check_seg_against_source(received[0], t1_dir)


def test_process_command_writes_a_valid_seg(phantom_weights, t1_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "destination: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        f"pipeline: {{model: {{weights_dir: '{phantom_weights}', home_dir: '{tmp_path / 'home'}'}}}}\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "process", str(t1_dir), "--output", str(out), "--config", str(config)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    segs = list(out.glob("*.dcm"))
    assert len(segs) == 1
    assert ": seg " in result.stdout
    check_seg_against_source(segs[0], t1_dir)
    assert dciodvfy_errors(segs[0]) == []
