"""The status page closed by default (``dicom_node.web.access``): reads need a token (the
read-only one cannot act), only the configured ``Host`` names are answered, every
response carries the security headers, wrong tokens are slowed down per client and
logged with its address, previews come from MR and CT images only, the tokens come from
files or environment variables, and a client that goes away leaves no traceback.

The endpoint runs in the test's process (no node, no model) over a real state store and
real instance files, and is asked over HTTP."""

from __future__ import annotations

import io
import logging
import socket
import struct
from pathlib import Path

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import generate_uid

from dicom_node.config import Destination
from dicom_node.store.state import JobState, JobUpdate, SeriesRef, StateStore
from dicom_node.web.access import Gate, Need, PageTokens, Throttle, default_hosts, host_allowed
from dicom_node.web.http import HttpEndpoint
from dicom_node.web.status_page import StatusPage
from tests.support.node import UI_READ_TOKEN, UI_TOKEN
from tests.support.wait import wait_until

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
READ = {"Authorization": f"Bearer {UI_READ_TOKEN}"}
ACT = {"Authorization": f"Bearer {UI_TOKEN}"}
DESTINATION = Destination(ae_title="PACS", host="127.0.0.1", port=104)


# -- without a server ---------------------------------------------------------------------

def test_host_names_are_matched_without_their_port():
    allowed = default_hosts("127.0.0.1")
    assert set(allowed) == {"127.0.0.1", "localhost", "::1"}
    for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080", "127.0.0.1", "localhost."):
        assert host_allowed(host, allowed), host
    for host in ("attacker.example", "attacker.example:8080", "127.0.0.2", "localhost.attacker.example", "",
                 None, "[::1", "localhost:http", "127.0.0.1@attacker.example"):
        assert not host_allowed(host, allowed), host
    assert host_allowed("node.example.org:443", ("node.example.org",))
    assert set(default_hosts("0.0.0.0")) == {"0.0.0.0", "localhost", "127.0.0.1", "::1"}  # a probe on loopback


def test_wrong_tokens_hold_a_client_back_for_a_time_that_doubles():
    now = [1000.0]
    throttle = Throttle(free_failures=5, first_block_seconds=2, max_block_seconds=60, forget_seconds=900,
                        max_clients=3, clock=lambda: now[0])
    for n in range(1, 5):
        assert throttle.failure("10.0.0.1") == (n, 0.0) and throttle.blocked("10.0.0.1") == 0
    assert throttle.failure("10.0.0.1") == (5, 2.0) and throttle.blocked("10.0.0.1") == 2.0
    assert throttle.blocked("10.0.0.2") == 0, "another client is not held back"
    now[0] += 2.5
    assert throttle.blocked("10.0.0.1") == 0
    assert throttle.failure("10.0.0.1") == (6, 4.0)
    for _ in range(10):
        _, block = throttle.failure("10.0.0.1")
    assert block == 60, "at most max_block_seconds"
    now[0] += 1000
    assert throttle.blocked("10.0.0.1") == 0 and throttle.failure("10.0.0.1") == (1, 0.0), "forgotten after a while"
    throttle.success("10.0.0.1")
    assert throttle.failure("10.0.0.1") == (1, 0.0), "a right token clears the count"
    for client in ("a", "b", "c", "d"):
        throttle.failure(client)
    assert len(throttle._clients) == 3, "a flood of addresses cannot fill memory"


def test_the_read_only_token_reads_and_cannot_act():
    gate = Gate(PageTokens(action=UI_TOKEN, read=UI_READ_TOKEN))
    assert gate.check(READ, "c", Need.READ, "GET /api/jobs") is None
    assert gate.check(ACT, "c", Need.READ, "GET /api/jobs") is None
    assert gate.check(ACT, "c", Need.ACT, "POST") is None
    refusal = gate.check(READ, "c", Need.ACT, "POST")
    assert refusal is not None and refusal.status == 403 and "read-only" in refusal.error
    assert gate.check({}, "c", Need.READ, "GET").status == 401
    public = Gate(PageTokens(read=UI_READ_TOKEN, public_read=True))
    assert public.check({}, "c", Need.READ, "GET") is None
    assert public.check(READ, "c", Need.ACT, "POST").status == 403, "no action token: no actions"
    with pytest.raises(ValueError):
        PageTokens(action=UI_TOKEN, read=UI_TOKEN)
    assert UI_TOKEN not in repr(PageTokens(action=UI_TOKEN, read=UI_READ_TOKEN))


# -- the endpoint over a real state store and real files ------------------------------------

def _series(state: StateStore, folder: Path, sources: list[Path], change=None) -> int:
    """A series of copies of ``sources`` (new UIDs, ``change`` applied to each), recorded
    and completed: its job's id."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    ref = SeriesRef("1.2.826.0.1.3680043.8.498.1", series_uid, "MODALITY", folder)
    for n, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if change is not None:
            change(ds)
        path = folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        state.record_instance(ref, ds.SOPInstanceUID, str(ds.SOPClassUID), path)
    return state.complete_series(series_uid)


def _secondary_capture(ds: pydicom.Dataset) -> None:
    """What a scanner's screenshot with the patient's demographics burned in looks like."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.Modality = "OT"
    ds.BurnedInAnnotation = "YES"


def _burned_in(ds: pydicom.Dataset) -> None:
    ds.BurnedInAnnotation = "YES"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, t1_dir):
    """The status page over a state store with three series: an MR series, a secondary
    capture with burned-in annotation and MR images marked BurnedInAnnotation YES."""
    folder = tmp_path_factory.mktemp("page_access")
    state = StateStore(folder / "state.db")
    sources = sorted(t1_dir.glob("*.dcm"))[:3]
    jobs = {"mr": _series(state, folder / "mr", sources),
            "sc": _series(state, folder / "sc", sources, _secondary_capture),
            "burned": _series(state, folder / "burned", sources, _burned_in)}
    for job in jobs.values():
        state.update_job(job, JobState.FAILED, JobUpdate(reason="test"))
    http = HttpEndpoint("127.0.0.1", 0, {"always": lambda: None}, lambda: b"# metrics\n",
                        pages=StatusPage(state, [DESTINATION], PageTokens(action=UI_TOKEN, read=UI_READ_TOKEN)))
    http.start()
    yield f"http://127.0.0.1:{http.port}", jobs, http
    http.stop()
    state.close()


def test_reads_need_a_token_and_the_read_only_token_cannot_retry(endpoint):
    url, jobs, _ = endpoint
    preview = f"{url}/api/jobs/{jobs['mr']}/preview.png"
    for path in ("/api/jobs", f"/api/jobs/{jobs['mr']}/preview.png"):
        answer = requests.get(url + path, timeout=10)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert requests.get(url + path, headers=READ, timeout=30).status_code == 200, path
        assert requests.get(url + path, headers=ACT, timeout=30).status_code == 200, path
    assert requests.get(preview, headers=READ, timeout=30).headers["Content-Type"] == "image/png"
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and "job-" not in page.text, "the shell loads without a token, and holds no data"
    refused = requests.post(f"{url}/api/jobs/{jobs['mr']}/retry", headers=READ, timeout=10)
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    assert requests.get(f"{url}/api/jobs", headers=READ, timeout=10).json()["can_act"] is False
    assert requests.get(f"{url}/api/jobs", headers=ACT, timeout=10).json()["can_act"] is True
    for path in ("/healthz", "/readyz", "/metrics"):  # orchestrators and Prometheus: open
        assert requests.get(url + path, timeout=10).status_code == 200, path


def test_another_host_name_is_refused_on_every_path(endpoint):
    url, _, http = endpoint
    for path in ("/", "/api/jobs", "/healthz", "/metrics", "/static/status.js"):
        answer = requests.get(url + path, headers={**READ, "Host": "attacker.example"}, timeout=10)
        assert answer.status_code == 421, path
        assert requests.get(url + path, headers={**READ, "Host": f"localhost:{http.port}"},
                            timeout=10).status_code == 200, path
    answer = requests.post(url + "/api/jobs/1/retry", headers={**ACT, "Host": "attacker.example:80"}, timeout=10)
    assert answer.status_code == 421


def test_every_response_carries_the_security_headers(endpoint):
    url, jobs, _ = endpoint
    answers = [requests.get(url + "/", timeout=10), requests.get(url + "/static/status.js", timeout=10),
               requests.get(url + "/api/jobs", headers=READ, timeout=10), requests.get(url + "/api/jobs", timeout=10),
               requests.get(f"{url}/api/jobs/{jobs['mr']}/preview.png", headers=READ, timeout=30),
               requests.get(url + "/healthz", timeout=10), requests.get(url + "/nothing", timeout=10),
               requests.get(url + "/", headers={"Host": "attacker.example"}, timeout=10)]
    assert [a.status_code for a in answers] == [200, 200, 200, 401, 200, 200, 404, 421]
    for answer in answers:
        headers = answer.headers
        policy = [part.strip() for part in headers["Content-Security-Policy"].split(";")]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, answer.url
        assert not any("unsafe-inline" in part or "*" in part for part in policy)
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-store"
    page = answers[0].text
    assert "<script>" not in page and "style=" not in page, "no inline script or style (the policy forbids them)"


def test_previews_only_from_mr_and_ct_images_without_burned_in_annotation(endpoint):
    url, jobs, _ = endpoint
    mr = requests.get(f"{url}/api/jobs/{jobs['mr']}/preview.png", headers=READ, timeout=30)
    assert mr.status_code == 200 and Image.open(io.BytesIO(mr.content)).format == "PNG"
    for name in ("sc", "burned"):
        answer = requests.get(f"{url}/api/jobs/{jobs[name]}/preview.png", headers=READ, timeout=30)
        assert answer.status_code == 404 and answer.headers["Content-Type"] == "application/json", name
        assert "burned-in annotation" in answer.json()["error"]


def test_previews_can_be_turned_off(tmp_path, t1_dir):
    state = StateStore(tmp_path / "state.db")
    job = _series(state, tmp_path / "mr", sorted(t1_dir.glob("*.dcm"))[:2])
    http = HttpEndpoint("127.0.0.1", 0, {}, lambda: b"", pages=StatusPage(
        state, [DESTINATION], PageTokens(read=UI_READ_TOKEN), previews=False))
    http.start()
    try:
        url = f"http://127.0.0.1:{http.port}"
        answer = requests.get(f"{url}/api/jobs/{job}/preview.png", headers=READ, timeout=30)
        assert answer.status_code == 404 and "ui_previews" in answer.json()["error"]
        assert requests.get(f"{url}/api/jobs", headers=READ, timeout=10).json()["previews"] is False
    finally:
        http.stop()
        state.close()


def test_wrong_tokens_get_429_after_five_and_the_log_names_the_client(tmp_path, caplog):
    state = StateStore(tmp_path / "state.db")
    http = HttpEndpoint("127.0.0.1", 0, {}, lambda: b"",
                        pages=StatusPage(state, [DESTINATION], PageTokens(action=UI_TOKEN, read=UI_READ_TOKEN)))
    http.start()
    caplog.set_level(logging.WARNING, logger="dicom_node.web")
    try:
        url = f"http://127.0.0.1:{http.port}/api/jobs"
        wrong = [f"guess-{n:02d}-not-the-token" for n in range(8)]
        answers = [requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10) for token in wrong]
        assert [a.status_code for a in answers] == [403] * 5 + [429] * 3
        assert 1 <= int(answers[5].headers["Retry-After"]) <= 2
        held = requests.get(url, headers=READ, timeout=10)
        assert held.status_code == 429, "while held back, even the right token waits"
        assert requests.get(url.replace("/api/jobs", "/healthz"), timeout=10).status_code == 200
        lines = [r.getMessage() for r in caplog.records if "wrong token from" in r.getMessage()]
        assert len(lines) == 5 and all("from 127.0.0.1" in line for line in lines), lines
        assert any("127.0.0.1 is held back" in r.getMessage() for r in caplog.records)
        assert not any(token in caplog.text for token in wrong + [UI_READ_TOKEN]), "a token in the log"
        wait_until(lambda: requests.get(url, headers=READ, timeout=10).status_code == 200, 5, 0.25,
                   "the right token after the pause")
    finally:
        http.stop()
        state.close()


def test_a_client_that_goes_away_mid_answer_leaves_no_traceback(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="dicom_node.web.http")
    http = HttpEndpoint("127.0.0.1", 0, {}, lambda: b"x" * 50_000_000)  # an answer far larger than the buffers
    http.start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", http.port)) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert client.recv(1024).startswith(b"HTTP/1.0 200")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
        wait_until(lambda: sum("went away" in r.getMessage() for r in caplog.records) >= 3, 20, 0.1,
                   "the endpoint noticing the three clients went away")
        assert requests.get(f"http://127.0.0.1:{http.port}/healthz", timeout=10).status_code == 200
    finally:
        http.stop()
    err = capfd.readouterr().err  # what socketserver prints for an error its handler let through:
    assert "Exception occurred during processing of request" not in err, err
    assert "BrokenPipe" not in err and "ConnectionReset" not in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "went away" in r.getMessage())


# -- the tokens at start ------------------------------------------------------------------

def test_tokens_come_from_files_or_environment_variables(tmp_path, monkeypatch):
    from dicom_node.config import parse_config
    from dicom_node.errors import ConfigError
    from dicom_node.service import StartupError, _ui_tokens, check_startup
    from tests.support.paths import free_port

    base = {"node": {"port": free_port()}, "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "storage": {"spool_dir": str(tmp_path / "spool"), "state_db": str(tmp_path / "state.db")}}
    (tmp_path / "read.token").write_text(UI_READ_TOKEN + "\n")
    http = {"port": free_port(), "ui": True, "ui_token_env": "DICOM_NODE_TEST_UI_TOKEN",
            "ui_read_token_file": "read.token"}
    config = parse_config({**base, "http": http}, tmp_path)
    monkeypatch.delenv("DICOM_NODE_TEST_UI_TOKEN", raising=False)
    with pytest.raises(StartupError, match="http.ui_token_env DICOM_NODE_TEST_UI_TOKEN: .*not set"):
        check_startup(config)
    monkeypatch.setenv("DICOM_NODE_TEST_UI_TOKEN", UI_TOKEN)
    check_startup(config)
    assert _ui_tokens(config) == PageTokens(action=UI_TOKEN, read=UI_READ_TOKEN)
    monkeypatch.setenv("DICOM_NODE_TEST_UI_TOKEN", UI_READ_TOKEN)
    with pytest.raises(ConfigError, match="must differ"):
        _ui_tokens(config)
    monkeypatch.setenv("DICOM_NODE_TEST_UI_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        _ui_tokens(config)
