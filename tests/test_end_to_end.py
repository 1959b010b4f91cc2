"""The node end to end, with real peers: Orthanc and dcmtk as PACS, the phantom model
run through TotalSegmentator's real API, dciodvfy and highdicom to check the SEG."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node.store.state import JobState
from tests.conftest import patient_strings
from tests.segcheck import check_seg_against_source
from tests.support.asserts import assert_exactly_one_seg, series_uid_of
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcess, node_config
from tests.support.paths import REPO, free_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def _all_sent(node: NodeProcess) -> bool:
    jobs = node.jobs()
    return bool(jobs) and all(job.state is JobState.SENT for job in jobs)


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def assert_log_is_private(node: NodeProcess, mri_dir: Path) -> None:
    log = node.log()
    assert log, "the node wrote no log"
    for secret in patient_strings(mri_dir):
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



def _metric(node: NodeProcess, name: str, labels: str = "") -> float:
    text = requests.get(f"http://127.0.0.1:{node.config['http']['port']}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.peers
def test_orthanc_round_trip(orthanc, node_port, make_node, phantom_weights, t1_dir, mri_dir):
    node = make_node((orthanc.ae_title, orthanc.dicom_port), phantom_weights, port=node_port,
                     http={"port": free_port()}).start()
    assert requests.get(f"http://127.0.0.1:{node.config['http']['port']}/healthz", timeout=10).status_code == 200
    assert _metric(node, "dicom_node_instances_received_total") == 0
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
    assert [job.state for job in node.jobs()] == [JobState.SENT]
    # the metrics a dashboard reads rose with the round trip
    assert _metric(node, "dicom_node_instances_received_total") == 35
    assert _metric(node, "dicom_node_series_total", '{outcome="seg"}') == 1
    assert _metric(node, "dicom_node_send_attempts_total", '{destination="pacs"}') == 1
    assert _metric(node, "dicom_node_jobs", '{state="sent"}') == 1
    assert _metric(node, "dicom_node_stage_seconds_count", '{stage="segment"}') == 1
    assert_log_is_private(node, mri_dir)


@pytest.mark.peers
def test_storescu_to_node_to_storescp(storescp, make_node, phantom_weights, t1_dir, mri_dir):
    node = make_node((storescp.ae_title, storescp.port), phantom_weights).start()
    storescu(node.port, t1_dir)
    wait_until(lambda: _all_sent(node), 300, 1, "the SEG at storescp")
    seg = assert_exactly_one_seg(storescp, series_uid_of(t1_dir)).path
    assert len(storescp.receptions()) == 1
    check_seg_against_source(seg, t1_dir)
    assert dciodvfy_errors(seg) == []
    assert_log_is_private(node, mri_dir)


@pytest.mark.peers
def test_sigterm_before_completion_then_restart_still_sends_the_seg(storescp, make_node, phantom_weights, t1_dir):
    node = make_node(
        (storescp.ae_title, storescp.port),
        phantom_weights,
        completion={"stable_seconds": 8, "complete_on_release": False},
    ).start()
    storescu(node.port, t1_dir)
    assert node.stop(signal.SIGTERM) == 0
    assert node.jobs() == [], "the series must not have completed before the stop"
    node.start()
    wait_until(lambda: _all_sent(node), 300, 1, "the SEG after the restart")
    check_seg_against_source(assert_exactly_one_seg(storescp, series_uid_of(t1_dir)).path, t1_dir)
    assert len(storescp.receptions()) == 1
    assert [job.state for job in node.jobs()] == [JobState.SENT]


@pytest.mark.peers
def test_missing_weights_fail_with_the_path_then_retry_succeeds(storescp, make_node, phantom_weights, t1_dir, tmp_path):
    weights = tmp_path / "empty_weights"
    node = make_node((storescp.ae_title, storescp.port), weights).start()
    storescu(node.port, t1_dir)
    jobs = wait_until(lambda: [j for j in node.jobs() if j.state is JobState.FAILED], 120, 0.5, "the failed job")
    assert str(weights / "Dataset297_TotalSegmentator_total_3mm_1559subj") in jobs[0].reason
    assert "weights_dir" in jobs[0].reason
    assert len(list(jobs[0].series.folder.glob("*.dcm"))) == 35, "the received series stays on disk"
    status = node.cli("status")
    assert "failed: 1" in status.stdout and "missing" in status.stdout

    shutil.copytree(phantom_weights, weights, dirs_exist_ok=True)
    retry = node.cli("retry", str(jobs[0].id))
    assert retry.returncode == 0, retry.stderr
    wait_until(lambda: _all_sent(node), 300, 1, "the SEG after the retry")
    check_seg_against_source(assert_exactly_one_seg(storescp, series_uid_of(t1_dir)).path, t1_dir)
    assert len(storescp.receptions()) == 1


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
    assert f"  wrote seg: {segs[0]}" in result.stdout
    check_seg_against_source(segs[0], t1_dir)
    assert dciodvfy_errors(segs[0]) == []


def test_process_keeps_one_warm_model_for_the_batch_and_writes_json_lines(phantom_weights, mri_dir, tmp_path):
    from tests.derived import copy_series

    batch = tmp_path / "batch"
    shutil.copytree(mri_dir / "t1_siemens_3t_fl2d_sag_hfs", batch / "a")
    copy_series(mri_dir / "t1_siemens_3t_fl2d_sag_hfs", batch / "b", seed="process-batch")
    shutil.copytree(mri_dir / "t2_siemens_3t_tse_ax_adi", batch / "t2")
    config = tmp_path / "elsewhere" / "config.yaml"  # relative paths resolve from the config's folder, as for serve
    config.parent.mkdir()
    config.write_text(
        "destination: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        f"pipeline: {{model: {{weights_dir: '{phantom_weights}', home_dir: home}}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "process", str(batch), "--output", str(tmp_path / "out"),
         "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["outcome"] for r in records) == ["seg", "seg", "skipped"]
    assert records[-1]["model_loads"] == 1, "one model load for the whole batch"
    skipped = next(r for r in records if r["outcome"] == "skipped")
    assert skipped["reason"].startswith("T2 series, not segmented by policy")
    assert (config.parent / "home" / "config.json").exists(), "home_dir resolved from the config's folder"
    assert len(list((tmp_path / "out").glob("*.seg.dcm"))) == 2
    listed = [Path(path) for record in records for path in record.get("objects", {}).values()]
    assert sorted(listed) == sorted((tmp_path / "out").iterdir()), "--json lists every object written"


@pytest.mark.peers
def test_multi_frame_and_4d_series_over_dicom_get_segs_on_the_right_frames(storescp, make_node, phantom_weights,
                                                                           t1_dir, tmp_path):
    """A Legacy Converted Enhanced MR object and a classic two-echo series, sent with
    storescu to a node configured to take the first volume of a 4D series."""
    from tests.derived import legacy_converted, two_echoes

    converted = legacy_converted(t1_dir, tmp_path / "converted")
    echo1, echo2 = two_echoes(t1_dir, tmp_path / "echoes")
    assert dciodvfy_errors(converted) == [], "the converted input itself must be valid"
    node = make_node((storescp.ae_title, storescp.port), phantom_weights, pipeline={"four_d": "first"}).start()
    storescu(node.port, [converted])
    storescu(node.port, echo1 + echo2)
    wait_until(lambda: len(node.jobs()) == 2 and _all_sent(node), 600, 1, "two SEGs at storescp")
    received = storescp.receptions()
    assert len(received) == 2
    by_series = {uid: assert_exactly_one_seg(storescp, uid).path for uid in (
        str(pydicom.dcmread(converted, stop_before_pixels=True).SeriesInstanceUID),
        str(pydicom.dcmread(echo1[0], stop_before_pixels=True).SeriesInstanceUID),
    )}
    converted_seg = check_seg_against_source(
        by_series[str(pydicom.dcmread(converted, stop_before_pixels=True).SeriesInstanceUID)],
        converted.parent,
    )
    assert {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for f in converted_seg.PerFrameFunctionalGroupsSequence} <= set(range(1, 36))
    echo_seg = by_series[str(pydicom.dcmread(echo1[0], stop_before_pixels=True).SeriesInstanceUID)]
    check_seg_against_source(echo_seg, echo1[0].parent, sources=echo1)  # echo 1 only
    for path in received:
        assert dciodvfy_errors(path) == []
    jobs = {job.state for job in node.jobs()}
    assert jobs == {JobState.SENT}
    assert any("4D series: volume 1 of 2 (the first, by EchoNumbers" in job.reason for job in node.jobs())


# MANIFEST.md: what the node must do with each shared series (process -> a SEG).
OUTCOMES = {
    "t1_siemens_3t_fl2d_sag_hfs": (JobState.SENT, "T1"),
    "t1_philips_3t_mprage_sag": (JobState.SENT, "T1"),
    "hard_j2k_lossless_t1_fl2d_sag_hfdl_derived": (JobState.SENT, "T1"),
    "t2_siemens_3t_tse_ax_adi": (JobState.SKIPPED, "T2"),
    "hard_missing_slice_t1_fl2d_sag_hfs_derived": (JobState.FAILED, "gap of 9.60 mm"),
    "hard_localizer_ge_3plane_phantom": (JobState.SKIPPED, "3 orientations"),
    "hard_enhanced_philips_pcasl_source_plus_raw": (JobState.SKIPPED, "PERFUSION"),
    "hard_ts_variants_siemens_epi_mosaic_1slice": (JobState.SKIPPED, "MOSAIC"),
    "hard_enhanced_philips_b0map_t1label_phantom": (JobState.SKIPPED, "field map"),
}


@pytest.mark.peers
def test_every_shared_series_over_dicom_gets_its_manifest_outcome(storescp, make_node, phantom_weights, mri_dir):
    node = make_node((storescp.ae_title, storescp.port), phantom_weights).start()
    series_of = {}
    for folder in OUTCOMES:
        files = sorted((mri_dir / folder).glob("*.dcm"))
        storescu(node.port, files)
        series_of[str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)] = folder

    def finished():
        jobs = node.jobs()
        done = [j for j in jobs if j.state in (JobState.SENT, JobState.SKIPPED, JobState.FAILED, JobState.NO_RESULT)]
        return jobs if len(done) == len(OUTCOMES) else None

    jobs = wait_until(finished, 900, 2, "every series to reach its outcome")
    outcomes = {series_of[j.series.series_instance_uid]: j for j in jobs}
    for folder, (state, phrase) in OUTCOMES.items():
        job = outcomes[folder]
        assert job.state is state, f"{folder}: {job.state.value}: {job.reason}"
        assert phrase in job.reason, f"{folder}: {job.reason}"
    t2 = outcomes["t2_siemens_3t_tse_ax_adi"]
    assert (t2.sequence_class, t2.preprocessing) == ("T2", None), "a T2 series is never inverted"
    sent = [outcomes[f] for f, (state, _) in OUTCOMES.items() if state is JobState.SENT]
    assert all(job.preprocessing == "invert_black_background" for job in sent)

    assert len(storescp.receptions()) == len(sent)
    for uid, folder in series_of.items():
        if OUTCOMES[folder][0] is JobState.SENT:
            check_seg_against_source(assert_exactly_one_seg(storescp, uid).path, mri_dir / folder)
    echo = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)], timeout=30)
    assert echo.returncode == 0, "the node must still be serving"
    status = node.cli("status")
    assert "skipped: 5" in status.stdout and "gap of 9.60 mm" in status.stdout
    assert_log_is_private(node, mri_dir)
