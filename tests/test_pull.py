"""``dicom-node pull`` against a real Orthanc as the PACS, with the node running.

Orthanc holds three studies (different StudyDates), each with a T1 and a T2 series
derived from the shared test data with new UIDs. ``pull --date`` over two of them
retrieves only their T1 series (the rules decide at series level, from the C-FIND or
QIDO-RS attributes: the T2 is never retrieved), by C-GET, C-MOVE and WADO-RS, and
exactly one SEG per T1 series arrives back in Orthanc, counted by receptions (Orthanc's
Lua filter logs each instance it receives, a duplicate too). The same pull again
retrieves nothing; a pull stopped by SIGTERM and run again ends the same, without
duplicates; ``--dry-run`` lists the decisions and retrieves nothing.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from pydicom.uid import generate_uid

from dicom_node.store.pulls import PullLog, PullState
from dicom_node.store.state import JobState, StateStore
from tests.support.node import UI_READ_TOKEN, UI_TOKEN, NodeProcess, node_config, node_settled, ui_http
from tests.support.chromium import start_chromium
from tests.support.orthanc import RECEPTION_LOG, Orthanc
from tests.support.paths import free_port
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.peers]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
DATES = ("20240115", "20240620", "20250310")  # --date below takes the first two
DATE_RANGE = "20240101-20241231"
T2_SLICES = 8  # the T2 copies are cut short: never retrieved, only queried


def _derive_study(t1_dir: Path, t2_dir: Path, out: Path, index: int) -> dict[str, str]:
    """Study ``index``: a T1 and a (shortened) T2 series with new UIDs and its own date."""
    study = generate_uid(entropy_srcs=["pull-test", str(index), "study"])
    patient = pydicom.dcmread(next(iter(sorted(t1_dir.glob("*.dcm")))), stop_before_pixels=True)
    uids = {"study": study}
    for kind, source, limit in (("t1", t1_dir, None), ("t2", t2_dir, T2_SLICES)):
        series = generate_uid(entropy_srcs=["pull-test", str(index), kind])
        frame = generate_uid(entropy_srcs=["pull-test", str(index), kind, "frame"])
        folder = out / f"study{index}" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob("*.dcm"))[:limit]:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=["pull-test", str(index), kind, path.name])
            ds.StudyDate = DATES[index]
            ds.PatientID, ds.PatientName = patient.PatientID, patient.PatientName  # one patient per study
            ds.AccessionNumber = f"PULL{index}"
            ds.save_as(folder / path.name, enforce_file_format=True)
        uids[kind] = series
    return uids


@pytest.fixture(scope="module")
def pull_node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, mri_dir: Path, pull_node_port: int):
    """Orthanc as the PACS (DIMSE and DICOMweb) with the three studies; it knows the
    node's AE title (C-MOVE's destination, and the caller of C-FIND and C-GET)."""
    folder = tmp_path_factory.mktemp("pull")
    studies = [_derive_study(mri_dir / "t1_siemens_3t_fl2d_sag_hfs", mri_dir / "t2_siemens_3t_tse_ax_adi",
                             folder / "data", index) for index in range(3)]
    pacs = Orthanc(folder / "orthanc", pull_node_port, dicomweb=True, lua=RECEPTION_LOG).start()
    try:
        for index in range(3):
            for kind in ("t1", "t2"):
                pacs.upload(folder / "data" / f"study{index}" / kind)
        yield pacs, studies
    finally:
        pacs.stop()


@pytest.fixture
def node(tmp_path: Path, archive, pull_node_port: int, phantom_weights: Path):
    pacs, _ = archive
    sources = [
        {"name": "get", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port, "retrieve": "get"},
        {"name": "move", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port, "retrieve": "move"},
        {"name": "web", "protocol": "dicomweb", "url": pacs.dicomweb_url},
    ]
    process = NodeProcess(tmp_path / "node", node_config(
        tmp_path / "node", destination=(pacs.ae_title, pacs.dicom_port), weights_dir=phantom_weights,
        node={"port": pull_node_port}, sources=sources, http=ui_http(tmp_path / "tokens"),
    ))
    yield process
    if process.process is not None:
        process.stop(signal.SIGKILL)


def _pull(node: NodeProcess, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", "pull", "--config", str(node.config_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=node.folder)


def _events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _audit(node: NodeProcess) -> list[dict]:
    path = node.folder / "audit.jsonl"  # beside the state store
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _instances(node: NodeProcess, series_uid: str) -> int:
    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        return state.instance_count(series_uid)
    finally:
        state.close()


def _segs_since(pacs: Orthanc, mark: int) -> list[str]:
    """The SeriesInstanceUID each SEG received since ``mark`` refers to (one entry per reception)."""
    referenced = []
    for sop_class, sop_uid in pacs.receptions()[mark:]:
        if sop_class != SEG:
            continue
        found = pacs.post("/tools/lookup", sop_uid)
        tags = pacs.get(f"/instances/{found[0]['ID']}/simplified-tags")
        referenced.append(tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"])
    return referenced


def _check_result(node: NodeProcess, pacs: Orthanc, studies: list[dict], mark: int) -> None:
    """Only the T1 series of the two studies in the range were received (whole), each
    made one job and exactly one SEG arrived for each."""
    wanted = [studies[0]["t1"], studies[1]["t1"]]
    assert [_instances(node, uid) for uid in wanted] == [35, 35]
    assert [_instances(node, study["t2"]) for study in studies] == [0, 0, 0]  # never retrieved
    assert _instances(node, studies[2]["t1"]) == 0  # outside the date range
    wait_until(lambda: node_settled(node, 2), 600, 1.0, "the pulled series processed and sent")
    wait_until(lambda: len(_segs_since(pacs, mark)) >= 2, 60, 0.5, "two SEGs at the PACS")
    jobs = node.jobs()
    assert sorted(job.series.series_instance_uid for job in jobs) == sorted(wanted)
    assert all(job.state is JobState.SENT for job in jobs), [(job.state, job.reason) for job in jobs]
    assert sorted(_segs_since(pacs, mark)) == sorted(wanted)  # one each, no duplicate


@pytest.mark.parametrize("source", ["get", "move", "web"])
def test_pull_by_date_retrieves_only_t1_and_one_seg_comes_back_each(node, archive, source):
    pacs, studies = archive
    mark = len(pacs.receptions())
    node.start()
    result = _pull(node, "--source", source, "--date", DATE_RANGE, "--json", "--wait", "600")
    assert result.returncode == 0, result.stderr
    events = _events(result.stdout)
    assert events[-1]["retrieved"] == 2 and events[-1]["failed"] == 0
    assert events[-1]["processed"] == 2 and events[-1]["sent"] == 2
    assert events[0]["to_retrieve"] == 2  # found: the T2 series and the SEGs of earlier runs decided "leave"
    _check_result(node, pacs, studies, mark)

    if source != "move":  # C-MOVE: the node's SCP audits the PACS's associations, as for any sender
        transfers = [event["what"] for event in _audit(node)  # received (C); a send reads (R)
                     if event["event"] == "DICOM Instances Transferred" and event["action"] == "C"]
        assert sorted(what["series_instance_uid"] for what in transfers) == sorted(
            [studies[0]["t1"], studies[1]["t1"]])
        assert all(what["received_count"] == 35 for what in transfers)

    again = _pull(node, "--source", source, "--date", DATE_RANGE, "--json")
    assert again.returncode == 0, again.stderr
    assert not [event for event in _events(again.stdout) if event["event"] in ("retrieving", "retrieved")]
    assert len(node.jobs()) == 2
    _check_result(node, pacs, studies, mark)


def test_pull_stopped_by_sigterm_resumes_without_duplicates(node, archive):
    pacs, studies = archive
    mark = len(pacs.receptions())
    node.start()
    args = [sys.executable, "-m", "dicom_node", "pull", "--config", str(node.config_path), "--source", "get",
            "--date", DATE_RANGE, "--json"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=node.folder)
    retrieving = 0
    seen = []
    assert first.stdout is not None
    for line in first.stdout:
        seen.append(line)
        if json.loads(line)["event"] == "retrieving":
            retrieving += 1
            if retrieving == 2:  # the first series retrieved, the second under way
                first.send_signal(signal.SIGTERM)
                break
    assert first.wait(timeout=60) == 1
    assert "stopped" in first.stderr.read()
    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        rows = [row for key in {run.pull_key for run in PullLog(state.db).runs()}
                for row in PullLog(state.db).series(key)]
    finally:
        state.close()
    assert sum(1 for row in rows if row.state is PullState.COMPLETED) == 1, (seen, rows)

    result = _pull(node, "--source", "get", "--date", DATE_RANGE, "--json", "--wait", "600")
    assert result.returncode == 0, result.stderr
    assert _events(result.stdout)[-1]["retrieved"] == 2
    _check_result(node, pacs, studies, mark)

    # another pull over the same study: already pulled with this configuration, unless --reprocess
    other = _pull(node, "--source", "web", "--study", studies[0]["study"], "--json", "--dry-run")
    listed = {record["series_instance_uid"]: record for record in _events(other.stdout)}
    assert listed[studies[0]["t1"]]["decision"] == "already pulled with this configuration"
    assert not listed[studies[0]["t1"]]["retrieve"]
    again = _pull(node, "--source", "get", "--date", DATE_RANGE, "--reprocess", "--json", "--wait", "600")
    assert again.returncode == 0, again.stderr
    jobs = node.jobs()
    assert sorted(job.reprocess_of for job in jobs if job.reprocess_of) == sorted(job.id for job in jobs[:2])
    wanted = [studies[0]["t1"], studies[1]["t1"]]
    wait_until(lambda: len(_segs_since(pacs, mark)) >= 4, 120, 0.5, "the reprocessed SEGs at the PACS")
    assert sorted(_segs_since(pacs, mark)) == sorted(wanted * 2)  # one more each: processed again on purpose


def test_dry_run_lists_the_decisions_and_retrieves_nothing(node, archive):
    pacs, studies = archive
    mark = len(pacs.receptions())
    node.folder.mkdir(parents=True, exist_ok=True)
    node.config_path.write_text(yaml.safe_dump(node.config))  # the node itself is not needed
    result = _pull(node, "--source", "web", "--date", DATE_RANGE, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    listed = {record["series_instance_uid"]: record for record in _events(result.stdout)}
    for study in studies[:2]:
        assert listed[study["t1"]]["retrieve"] is True
        assert listed[study["t1"]]["decision"].startswith("process (T1")
        assert listed[study["t2"]]["retrieve"] is False
        assert "T2 series, not segmented by policy" in listed[study["t2"]]["decision"]
    assert studies[2]["t1"] not in listed and studies[2]["t2"] not in listed
    assert all(not record["retrieve"] for record in listed.values() if record["modality"] != "MR")
    text = _pull(node, "--source", "get", "--date", DATE_RANGE, "--dry-run")
    assert text.returncode == 0, text.stderr
    assert f"leave: study {studies[0]['study']}" in text.stdout and "T2 series, not segmented" in text.stdout
    assert all(_instances(node, study[kind]) == 0 for study in studies for kind in ("t1", "t2"))
    assert pacs.receptions()[mark:] == []


def test_status_page_starts_a_pull_that_resumes_after_a_restart(node, archive):
    """The page's pull, started in headless Chromium with the action token (401 without
    a token, 403 with the read-only one), its progress on the page, and the pull resumed
    by the node after a stop in the middle of it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pacs, studies = archive
    mark = len(pacs.receptions())
    node.start()
    page = f"http://127.0.0.1:{node.config['http']['port']}"
    url = f"{page}/api/pulls"
    wait_until(lambda: _page_up(url), 60, 0.5, "the status page")
    query = {"source": "move", "date": DATE_RANGE}
    assert requests.post(url, params=query, timeout=10).status_code == 401
    read = {"Authorization": f"Bearer {UI_READ_TOKEN}"}
    assert requests.post(url, params=query, headers=read, timeout=10).status_code == 403
    assert not requests.get(url, headers=read, timeout=10).json()["pulls"]

    browser = start_chromium()
    try:
        browser.get(page)
        browser.find_element(By.ID, "token").send_keys(UI_TOKEN + "\n")
        WebDriverWait(browser, 30, 0.2).until(lambda d: d.find_element(By.ID, "pulls").is_displayed(),
                                              "the pulls on the page")
        Select(browser.find_element(By.ID, "pull-source")).select_by_value("move")
        browser.find_element(By.CSS_SELECTOR, "#pull-form input[name=date]").send_keys(DATE_RANGE)
        browser.find_element(By.CSS_SELECTOR, "#pull-form button").click()
        message = browser.find_element(By.ID, "pull-message")
        WebDriverWait(browser, 30, 0.2).until(lambda d: "started" in message.text, "the pull started")
        pulls = requests.get(url, headers=read, timeout=10).json()["pulls"]
        assert len(pulls) == 1 and pulls[0]["started_by"] == "page"
        key = pulls[0]["pull"]

        def progress() -> dict:
            pulls = requests.get(url, headers=read, timeout=10).json()["pulls"]
            return next(pull for pull in pulls if pull["pull"] == key)

        # the two studies' series, and the SEGs earlier tests of the module sent to them
        wait_until(lambda: progress()["progress"]["found"] >= 4, 60, 0.2, "the pull's query")
        node.stop()  # in the middle of the pull (or just after): the node resumes it at start
        node.start()
        wait_until(lambda: _page_up(url), 60, 0.5, "the status page again")
        done = wait_until(lambda: (lambda p: p if p["progress"]["sent"] == 2 else None)(progress()), 600, 1.0,
                          "the page's pull retrieved, processed and sent")
        assert done["state"] == "ended" and done["arguments"]["date"] == DATE_RANGE
        browser.get(page)
        token = browser.find_element(By.ID, "token")
        token.clear()  # the page kept it for the session
        token.send_keys(UI_TOKEN + "\n")
        selector = f"#pull-table tr[data-pull='{key}'] td.pull-progress"
        shown = WebDriverWait(browser, 30, 0.2).until(  # the rows are drawn again every 5 s: read them in one go
            lambda d: d.execute_script("const cell = document.querySelector(arguments[0]);"
                                       " return cell ? cell.textContent : null;", selector), "the pull's row")
        assert re.fullmatch(r"found \d+, retrieved 2/2, processed 2, sent 2", shown), shown
    finally:
        browser.quit()
    _check_result(node, pacs, studies, mark)


def _page_up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 401
    except requests.RequestException:
        return False
