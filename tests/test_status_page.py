"""The status page (``http.ui: true``): the preview drawn from a real series and SEG, and
Debian's headless Chromium (through selenium and chromium-driver) against the page of a
node during an Orthanc round trip: no data without a token, the jobs with their state
and reason with the read-only token, a filter, the preview image, and retry refused
without the action token and queued with it; a 5000-character text keeps its row short."""

from __future__ import annotations

import io
import logging
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from dicom_node.store.state import JobState, JobUpdate
from dicom_node.web.status_page import middle_image, overlay, render_preview
from tests.conftest import patient_strings
from tests.derived import copy_series
from tests.support.node import UI_READ_TOKEN, UI_TOKEN, NodeProcess, node_config, ui_http
from tests.support.orthanc import Orthanc
from tests.support.paths import REPO, free_port
from tests.support.wait import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = UI_TOKEN
READ = {"Authorization": f"Bearer {UI_READ_TOKEN}"}
ARTIFACTS = REPO / ".cache" / "artifacts"


# -- the preview, without a node -------------------------------------------------------------

def test_overlay_draws_each_label_in_its_colour_over_grey():
    pixels = np.tile(np.arange(100, dtype=np.uint16), (40, 1))  # a ramp, 40 rows x 100 columns
    labels = np.zeros(pixels.shape, dtype=np.uint16)
    labels[5:10, 20:30] = 1
    labels[30:35, 60:70] = 7
    image = np.asarray(overlay(pixels, labels, {1: (255, 0, 0)}))
    assert image.shape == (40, 100, 3)
    grey = image[20, 50]
    assert grey[0] == grey[1] == grey[2]  # unlabelled: grey
    red = image[7, 25].astype(int)
    assert red[0] > red[1] + 100 and red[1] == red[2]  # label 1 in its colour, half over the grey
    other = image[32, 65].astype(int)
    assert len(set(other)) > 1  # label 7 has no colour given: one from the palette
    assert np.asarray(overlay(pixels, None, {}, aspect=2.0)).shape == (80, 100, 3)  # square pixels
    with pytest.raises(ValueError):
        overlay(pixels, labels[:10], {})


@pytest.fixture(scope="module")
def seg_on_t1(t1_dir, tmp_path_factory):
    """SEGs of the shared T1 series written by the node's encoder from label maps placed by
    the test: one with a box over every slice and a mark on the middle slice, one whose
    structures lie only on the first slices."""
    from pipeline.input.classify import Classification, SequenceClass
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume
    from pipeline.model.types import LabelMap
    from pipeline.outputs.seg import encode_seg
    from pipeline.process import algorithm_for
    from pipeline.settings import PipelineSettings

    paths = sorted(t1_dir.glob("*.dcm"))
    volume = read_volume(load_series(paths))
    middle = len(volume.series.slices) // 2
    algorithm = algorithm_for(PipelineSettings(), PreprocessingMode.INVERT_BLACK_BACKGROUND,
                              Classification(SequenceClass.T1, True, "test"))
    folder = tmp_path_factory.mktemp("segs")
    written = {}
    for name, boxes in {
        "box": [((slice(None), slice(100, 150), slice(60, 90)), 90), ((middle, slice(30, 40), slice(30, 40)), 3)],
        "elsewhere": [((slice(0, 3), slice(100, 150), slice(60, 90)), 90)],
    }.items():
        array = np.zeros(volume.array.shape, dtype=np.uint16)
        for where, label in boxes:
            array[where] = label
        seg = encode_seg(LabelMap(array, {3: "kidney_left", 90: "brain"}, volume), algorithm)
        written[name] = folder / f"{name}.dcm"
        seg.save_as(written[name], enforce_file_format=True)
    return paths, written, volume.series.slices[middle]


def _png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(int)


def _coloured(pixel) -> bool:
    return max(pixel) - min(pixel) > 20


def test_the_preview_is_the_middle_slice_with_the_seg_drawn_over_it(seg_on_t1):
    paths, segs, middle = seg_on_t1
    chosen, frame = middle_image(list(reversed(paths)))  # the order of the files does not matter
    assert frame is None
    assert pydicom.dcmread(chosen, stop_before_pixels=True).SOPInstanceUID == pydicom.dcmread(
        middle.path, stop_before_pixels=True).SOPInstanceUID
    image = _png(render_preview(paths, segs["box"]))
    assert image.shape[:2] == (256, 256)
    assert _coloured(image[125, 75]), "the box lies on every slice, the middle one too"
    assert _coloured(image[35, 35]), "the mark on the middle slice"
    assert not _coloured(image[200, 200]) and not _coloured(image[125, 100])
    assert tuple(image[125, 75]) != tuple(image[35, 35]), "two structures, two colours"
    plain = _png(render_preview(paths, None))
    assert not any(_coloured(p) for p in plain.reshape(-1, 3)[::97])
    elsewhere = _png(render_preview(paths, segs["elsewhere"]))
    assert not _coloured(elsewhere[125, 75]), "nothing of the SEG lies on the middle slice"


# -- the page in a browser, during an Orthanc round trip ------------------------------------------

FAMILY, GIVEN, MRN, BIRTH = "Mustermann", "Erika", "MRN778899", "19641231"
SCANNER_COPIED = {"SeriesDescription": f"t1 {FAMILY} {GIVEN} {MRN}", "StudyDescription": f"Kopf {FAMILY} {BIRTH}",
                  "ProtocolName": f"t1_{GIVEN.upper()}_{MRN}"}

@pytest.fixture(scope="module")
def page_node(tmp_path_factory, phantom_weights, t1_dir, mri_dir):
    """A node with the status page on, after Orthanc sent it the T1 series (segmented and
    sent back) and a T2 series (skipped by policy). The T1 copy names its patient in its
    free text, as scanners sometimes copy it (``SCANNER_COPIED``)."""
    folder = tmp_path_factory.mktemp("status_page")
    t1_copy = folder / "t1"
    for path in copy_series(t1_dir, t1_copy, "status-page"):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{FAMILY}^{GIVEN}", MRN, BIRTH
        for keyword, text in SCANNER_COPIED.items():
            setattr(ds, keyword, text)
        ds.save_as(path)
    node_port = free_port()
    orthanc = Orthanc(folder / "orthanc", node_port=node_port).start()
    config = node_config(folder / "node", destination=(orthanc.ae_title, orthanc.dicom_port),
                         weights_dir=phantom_weights, http=ui_http(folder / "node"))
    config["node"]["port"] = node_port
    node = NodeProcess(folder / "node", config).start()
    try:
        series = orthanc.upload(t1_copy) + orthanc.upload(mri_dir / "t2_siemens_3t_tse_ax_adi")
        orthanc.post("/modalities/node/store", {"Resources": series, "Synchronous": True})

        def ended():
            jobs = node.jobs()
            states = sorted(job.state.value for job in jobs)
            return jobs if states == ["sent", "skipped"] else None

        wait_until(ended, 300, 1, "the T1 series sent and the T2 series skipped")
        yield node, orthanc
    finally:
        node.stop(signal.SIGKILL)
        orthanc.stop()


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).is_file(), f"{path} is missing: `make peers` installs Debian's chromium and chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # selenium logs every answer of the driver at DEBUG (screenshots as base64, whose
    # random letters the suite's privacy scan would read as patient data): keep it quiet
    logging.getLogger("selenium").setLevel(logging.INFO)
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1500,900", "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _url(node: NodeProcess, path: str = "/") -> str:
    return f"http://127.0.0.1:{node.config['http']['port']}{path}"


def _wait(driver, predicate, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d), message=what)


def _row(driver, job_id: int):
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.ID, f"job-{job_id}")
    return rows[0] if rows else None


@pytest.mark.e2e
@pytest.mark.peers
def test_the_page_shows_the_jobs_the_preview_and_refuses_retry_without_the_token(page_node, browser, mri_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    node, _ = page_node
    jobs = {job.state: job for job in node.jobs()}
    sent, skipped = jobs[JobState.SENT], jobs[JobState.SKIPPED]
    browser.get(_url(node))

    # without a token: the shell only, its data refused
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-jobs-status"), "the first read")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-jobs-status") == "401"
    assert _row(browser, sent.id) is None and browser.find_element(By.ID, "locked").is_displayed()
    assert requests.get(_url(node, "/api/jobs"), timeout=30).status_code == 401
    assert requests.get(_url(node, f"/api/jobs/{sent.id}/preview.png"), timeout=30).status_code == 401
    rebound = requests.get(_url(node, "/api/jobs"), headers={**READ, "Host": "attacker.example"}, timeout=30)
    assert rebound.status_code == 421, "DNS rebinding: another host name is refused"
    shell = requests.get(_url(node), timeout=30)
    assert shell.headers["Cache-Control"] == "no-store" and shell.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'self'" in shell.headers["Content-Security-Policy"]

    # the read-only token, typed into the page: the jobs with their state and reason
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(UI_READ_TOKEN + Keys.ENTER)
    row = _wait(browser, lambda d: _row(d, sent.id), "the sent job's row")
    assert not browser.find_element(By.ID, "locked").is_displayed()
    assert row.get_attribute("data-state") == "sent"
    assert sent.reason in row.text and "sent" in row.text
    assert "T1" in row.text and "invert_black_background" in row.text
    skipped_row = _row(browser, skipped.id)
    assert skipped.reason in skipped_row.text and "skipped" in skipped_row.text
    assert f"pacs (ORTHANC@127.0.0.1:{node.config['destination']['port']}; 0 pending, 0 failed)" in browser.page_source

    # the preview image loads
    image = row.find_element(By.CSS_SELECTOR, "img.preview")
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
          "the preview image", timeout=60)
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
    assert image.get_attribute("src").startswith("blob:"), "fetched with the token, never a token in a URL"
    preview = requests.get(_url(node, f"/api/jobs/{sent.id}/preview.png"), headers=READ, timeout=60)
    assert preview.status_code == 200 and preview.headers["Content-Type"] == "image/png"
    assert any(_coloured(p) for p in _png(preview.content).reshape(-1, 3)[::7]), "the SEG is drawn over the slice"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    assert browser.save_screenshot(str(shot))
    shutil.copyfile(shot, REPO / "docs" / "status-page.png")

    # a filter by state
    box = browser.find_element(By.CSS_SELECTOR, "#filters input[value='skipped']")
    box.click()
    _wait(browser, lambda d: _row(d, sent.id) is None and _row(d, skipped.id) is not None, "only the skipped job")
    box.click()
    _wait(browser, lambda d: _row(d, sent.id) is not None, "every job again")

    # no patient names, IDs or birth dates, on the page or in its data
    text = browser.page_source + requests.get(_url(node, "/api/jobs"), headers=READ, timeout=30).text
    for secret in patient_strings(mri_dir):
        assert secret not in text, f"the status page shows patient data ({secret!r})"

    # retry with the read-only token (or none): refused, nothing queued
    before = [(job.id, job.state) for job in node.jobs()]
    _row(browser, sent.id).find_element(By.CSS_SELECTOR, "button.retry").click()
    message = browser.find_element(By.ID, "message")
    _wait(browser, lambda d: message.get_attribute("data-status"), "the answer to the retry")
    assert message.get_attribute("data-status") == "403" and "read-only token" in message.text
    wrong = requests.post(_url(node, f"/api/jobs/{sent.id}/retry"), headers={"Authorization": "Bearer wrong"},
                          timeout=30)
    assert wrong.status_code == 403
    assert requests.post(_url(node, f"/api/jobs/{sent.id}/retry"), timeout=30).status_code == 401
    assert [(job.id, job.state) for job in node.jobs()] == before, "a refused retry queued something"
    browser.save_screenshot(str(ARTIFACTS / "status-page-refused.png"))


@pytest.mark.e2e
@pytest.mark.peers
def test_retry_with_the_token_queues_the_job(page_node, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    node, _ = page_node
    skipped = next(job for job in node.jobs() if job.state is JobState.SKIPPED)
    browser.get(_url(node))
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(TOKEN + Keys.ENTER)  # the action token reads too
    _wait(browser, lambda d: _row(d, skipped.id), "the skipped job's row")
    _row(browser, skipped.id).find_element(By.CSS_SELECTOR, "button.retry").click()
    message = browser.find_element(By.ID, "message")
    _wait(browser, lambda d: message.get_attribute("data-status"), "the answer to the retry")
    assert message.get_attribute("data-status") == "202", message.text
    again = [job for job in node.jobs() if job.reprocess_of == skipped.id]
    assert len(again) == 1, "the retry queued one new job for the skipped series"
    assert again[0].series.series_instance_uid == skipped.series.series_instance_uid
    assert f"queued again as job {again[0].id}" in message.text
    assert {job.id: job for job in node.jobs()}[skipped.id].state is JobState.SKIPPED, "the old job keeps its outcome"
    _wait(browser, lambda d: _row(d, again[0].id), "the new job on the page")
    browser.save_screenshot(str(ARTIFACTS / "status-page-queued.png"))


@pytest.mark.e2e
@pytest.mark.peers
def test_a_patient_named_in_free_text_is_masked_wherever_the_node_shows_the_series(page_node, browser):
    """The T1 copy's SeriesDescription, StudyDescription and ProtocolName name its patient:
    the page shows the description masked, and no surface carries a name part or the ID."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    node, _ = page_node
    sent = next(job for job in node.jobs() if job.state is JobState.SENT)
    browser.get(_url(node))
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(UI_READ_TOKEN + Keys.ENTER)
    row = _wait(browser, lambda d: _row(d, sent.id), "the sent job's row")
    assert "t1 *** *** ***" in row.text, "the description is shown, masked"
    api = requests.get(_url(node, "/api/jobs"), headers=READ, timeout=30)
    [record] = [record for record in api.json()["jobs"] if record["id"] == sent.id]
    assert record["series_description"] == "t1 *** *** ***"
    assert "t1 *** *** ***" in (sent.routing or ""), "the routing explanation masks it the same way"
    sends = record["sends"]  # and the row counts its sends in the words of `dicom-node status`
    tries = sum(item["attempts"] for item in sends)
    assert f"{len(sends)} of {len(sends)} object(s) delivered in {tries} send attempt(s)" in row.text, row.text
    surfaces = {
        "the page": browser.page_source,
        "/api/jobs": api.text,
        "/metrics": requests.get(_url(node, "/metrics"), timeout=30).text,
        "status --json": node.cli("status", "--json").stdout,
        "status": node.cli("status").stdout,
        "the node's log": node.log(),
        "the audit trail": (Path(node.config["storage"]["state_db"]).parent / "audit.jsonl").read_text(),
    }
    for surface, text in surfaces.items():
        assert text.strip(), f"{surface} is empty"
        for secret in (FAMILY, GIVEN, MRN, BIRTH):
            assert secret.lower() not in text.lower(), f"{secret!r} on {surface}"


# -- the token, without a browser ------------------------------------------------------------------

def test_the_tokens_are_never_written_in_the_config_and_the_page_is_closed_by_default(tmp_path):
    from dicom_node.config import parse_config
    from dicom_node.errors import ConfigError

    base = {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    with pytest.raises(ConfigError, match="http.ui_token: .*not written in the config.*http.ui_token_file"):
        parse_config({**base, "http": {"ui": True, "ui_token": TOKEN}}, tmp_path)
    with pytest.raises(ConfigError, match="http: .*not both"):
        parse_config({**base, "http": {"ui": True, "ui_token_env": "T", "ui_token_file": "t"}}, tmp_path)
    with pytest.raises(ConfigError, match="http: .*closed to readers without a token.*ui_public_read"):
        parse_config({**base, "http": {"ui": True}}, tmp_path)
    assert parse_config({**base, "http": {"ui": True, "ui_public_read": True}}, tmp_path).http.ui_public_read
    config = parse_config({**base, "http": {"ui": True, "ui_token_file": "secrets/ui.token",
                                            "ui_read_token_file": "secrets/read.token"}}, tmp_path)
    assert config.http.ui_token_file == tmp_path / "secrets" / "ui.token"  # from the config's folder
    assert config.http.ui_read_token_file == tmp_path / "secrets" / "read.token"


@pytest.mark.peers
def test_an_unreadable_token_file_stops_start_up_in_one_line(tmp_path, phantom_weights):
    import subprocess
    import sys

    import yaml

    missing = tmp_path / "ui.token"
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         http={"port": free_port(), "ui": True, "ui_token_file": str(missing)})
    (tmp_path / "node").mkdir()
    path = tmp_path / "node" / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 6 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"dicom-node: http.ui_token_file {missing} cannot be read"
                                              " (No such file or directory)")


@pytest.fixture
def page_endpoint(tmp_path):
    """The status page on a real HTTP endpoint over a state store with a failed and a
    received job (no node, no model)."""
    from dicom_node.config import Destination
    from dicom_node.store.state import SeriesRef, StateStore
    from dicom_node.web.http import HttpEndpoint
    from dicom_node.web.access import PageTokens
    from dicom_node.web.status_page import StatusPage

    state = StateStore(tmp_path / "state.db")
    for n in (1, 2):
        ref = SeriesRef("1.2.3", f"1.2.3.{n}", "MODALITY", tmp_path)
        state.record_instance(ref, f"1.2.3.{n}.1", "1.2.840.10008.5.1.4.1.1.4", tmp_path / f"missing{n}.dcm")
        state.complete_series(ref.series_instance_uid)
    state.update_job(1, JobState.FAILED, JobUpdate(reason="test failure"))
    endpoint = HttpEndpoint("127.0.0.1", 0, {}, lambda: b"",
                            pages=StatusPage(state, [Destination(ae_title="PACS", host="127.0.0.1", port=104)],
                                             PageTokens(action=TOKEN, read=UI_READ_TOKEN)))
    endpoint.start()
    yield f"http://127.0.0.1:{endpoint.port}", state
    endpoint.stop()
    state.close()


def test_actions_need_the_token_and_refusals_queue_nothing(page_endpoint):
    url, state = page_endpoint

    def retry(job: int, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return requests.post(f"{url}/api/jobs/{job}/retry", headers=headers, timeout=10)

    before = [(job.id, job.state) for job in state.jobs()]
    answer = retry(1)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert retry(1, "not-the-token-at-all").status_code == 403
    assert requests.post(f"{url}/api/jobs/1/retry", headers={"Authorization": TOKEN}, timeout=10).status_code == 403
    read_only = retry(1, UI_READ_TOKEN)
    assert read_only.status_code == 403 and "read-only token" in read_only.json()["error"]
    assert requests.get(f"{url}/api/jobs/1/retry", timeout=10).status_code == 405
    assert [(job.id, job.state) for job in state.jobs()] == before
    assert retry(2, TOKEN).status_code == 409  # received: not ended
    assert retry(99, TOKEN).status_code == 404
    queued = retry(1, TOKEN)
    assert queued.status_code == 202 and queued.json() == {"job": 1, "state": "received", "retry_of": 1}
    assert state.job(1).state is JobState.RECEIVED


def test_the_job_list_and_its_filters(page_endpoint):
    url, _ = page_endpoint
    data = requests.get(f"{url}/api/jobs", headers=READ, timeout=10).json()
    assert [job["id"] for job in data["jobs"]] == [2, 1]  # newest first
    assert data["destinations"] == [{"name": "pacs", "peer": "PACS@127.0.0.1:104", "outputs": ["seg"], "pending": 0,
                                     "sent": 0, "failed": 0, "held": 0}] and data["actions"]
    assert data["previews"] and not data["can_act"]  # the read-only token cannot act
    failed = requests.get(f"{url}/api/jobs?state=failed", headers=READ, timeout=10).json()["jobs"]
    assert [(job["id"], job["reason"]) for job in failed] == [(1, "test failure")]
    assert requests.get(f"{url}/api/jobs?state=lost", headers=READ, timeout=10).status_code == 400
    assert requests.get(f"{url}/api/jobs/1/preview.png", headers=READ, timeout=10).status_code == 404  # not on disk
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and '<script src="/static/status.js">' in page.text
    for name in ("status.js", "status.css"):
        assert requests.get(f"{url}/static/{name}", timeout=10).status_code == 200
    assert requests.get(f"{url}/static/../ui.py", timeout=10).status_code == 404
    assert "http" not in requests.get(f"{url}/static/status.js", timeout=10).text.replace("HTTP", ""), \
        "the page loads nothing from elsewhere"


@pytest.mark.peers
def test_a_5000_character_text_keeps_its_row_short(tmp_path, t1_dir, browser):
    """A scanner's 5000-character SeriesDescription and a 5000-character reason: cut to a
    few lines on the page (the whole of it on hover), never a row thousands of pixels tall."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from dicom_node.config import Destination
    from dicom_node.store.state import SeriesRef, StateStore
    from dicom_node.web.access import PageTokens
    from dicom_node.web.http import HttpEndpoint
    from dicom_node.web.status_page import StatusPage

    long_text = " ".join(f"word{n:04d}" for n in range(600))[:5000]
    state = StateStore(tmp_path / "state.db")
    ds = pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0])
    (tmp_path / "in").mkdir()
    with warnings.catch_warnings():  # longer than a DICOM LO allows: scanners write them anyway
        warnings.simplefilter("ignore", UserWarning)
        ds.SeriesDescription = long_text[:4000]
        ds.save_as(tmp_path / "in" / "1.dcm")
    ref = SeriesRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "MODALITY", tmp_path / "in")
    state.record_instance(ref, str(ds.SOPInstanceUID), str(ds.SOPClassUID), tmp_path / "in" / "1.dcm")
    job = state.complete_series(ref.series_instance_uid)
    state.update_job(job, JobState.FAILED, JobUpdate(reason=long_text, last_error="e" * 5000))
    http = HttpEndpoint("127.0.0.1", 0, {}, lambda: b"", pages=StatusPage(
        state, [Destination(ae_title="PACS", host="127.0.0.1", port=104)], PageTokens(read=UI_READ_TOKEN),
        previews=False))
    http.start()
    try:
        browser.get(f"http://127.0.0.1:{http.port}/")
        token = browser.find_element(By.ID, "token")
        token.clear()
        token.send_keys(UI_READ_TOKEN + Keys.ENTER)
        row = _wait(browser, lambda d: _row(d, job), "the job's row")
        height = browser.execute_script("return arguments[0].getBoundingClientRect().height", row)
        assert 20 < height < 300, f"a row {height} px tall"
        reason = row.find_element(By.CSS_SELECTOR, ".reason")
        assert len(reason.text) < 300 and reason.get_attribute("title") == long_text, "cut, the whole on hover"
    finally:
        http.stop()
        state.close()
