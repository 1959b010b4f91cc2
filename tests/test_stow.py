"""The STOW-RS sender against a real Orthanc with its DICOMweb plugin (Debian's
orthanc 1.10 and orthanc-dicomweb 1.7): what is stored, and how each failure is told."""

from __future__ import annotations

import base64
import json
import logging
import select
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
import requests
import urllib3
from pydicom.uid import generate_uid

from dicom_node.config import Destination, HttpAuth
from dicom_node.errors import ConfigError, SendError
from dicom_node.send.dicomweb import _authorization, _outcome, stow_files
from tests.support.orthanc import Orthanc
from tests.support.paths import LOCALHOST, data_dir, free_port

USER, PASSWORD = "node", "s3cret-Passw0rd"
SERIES = "t1_philips_3t_mprage_sag"

# Orthanc runs this filter on every instance it receives. An error, not ``return false``:
# Orthanc 1.10 answers a filtered-out instance with success, and the plugin reports it stored.
REFUSING_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SeriesDescription == "REFUSE ME" then
    error("refused by the test's filter")
  end
  return true
end
"""


@pytest.fixture
def make_orthanc(tmp_path: Path):
    started: list[Orthanc] = []

    def start(**options) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(started)}", node_port=free_port(), dicomweb=True, **options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def instances() -> list[Path]:
    """Four instances of a shared series, as they are."""
    return sorted((data_dir() / SERIES).glob("*.dcm"))[:4]


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    return path


def _basic(password_file: Path, username: str = USER) -> HttpAuth:
    return HttpAuth(type="basic", username=username, password_file=password_file)


def _destination(url: str, **fields) -> Destination:
    """A DICOMweb destination. Credentials over http:// and verify_tls: false need
    allow_insecure: the test's Orthanc speaks plain HTTP on 127.0.0.1 (its own HTTPS
    crashes, see ``_TlsFront``)."""
    insecure = (url.startswith("http://") and fields.get("auth") is not None) or fields.get("verify_tls") is False
    return Destination(protocol="dicomweb", url=url, allow_insecure=insecure, **fields)


def _variant(source: Path, folder: Path, **changes) -> tuple[Path, str]:
    """A copy of ``source`` with a new SOPInstanceUID and ``changes`` (None deletes)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _stored(orthanc: Orthanc) -> set[str]:
    """The SOPInstanceUIDs Orthanc holds, read through its REST API."""
    return {orthanc.get(f"/instances/{id_}")["MainDicomTags"]["SOPInstanceUID"] for id_ in orthanc.get("/instances")}


@pytest.mark.peers
def test_stow_stores_every_file_in_one_request_with_basic_auth(make_orthanc, instances, password_file, caplog):
    orthanc = make_orthanc(users={USER: PASSWORD})
    destination = _destination(orthanc.dicomweb_url + "/", auth=_basic(password_file))  # a trailing slash is fine
    with caplog.at_level(logging.INFO, logger="dicom_node.send.dicomweb"):
        outcome = stow_files(instances, destination, timeout=60)
    assert (outcome.status, outcome.warning) == (200, None)
    assert _stored(orthanc) == _uids(instances) and len(orthanc.get("/instances")) == len(instances)
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.send.dicomweb"]
    assert lines == [f"stored 4 instances at {destination.url} (STOW-RS, HTTP 200 OK)"]
    header = pydicom.dcmread(instances[0], stop_before_pixels=True)
    assert str(header.PatientName) not in caplog.text and str(header.PatientID) not in caplog.text


@pytest.mark.peers
def test_wrong_password_is_refused_permanently_without_the_secret_in_the_message(
        make_orthanc, instances, tmp_path):
    orthanc = make_orthanc(users={USER: PASSWORD})
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-Passw0rd")
    with pytest.raises(SendError) as caught:
        stow_files(instances, _destination(orthanc.dicomweb_url, auth=_basic(wrong)), timeout=60)
    error = caught.value
    assert (error.kind, error.permanent, error.peer) == ("not authorised", True, orthanc.dicomweb_url)
    assert "401" in str(error) and "not-the-Passw0rd" not in str(error) and PASSWORD not in str(error)
    assert orthanc.get("/instances") == []


@pytest.mark.peers
def test_a_bearer_token_is_sent_as_bearer_and_a_basic_auth_orthanc_refuses_it(
        make_orthanc, instances, monkeypatch):
    """Orthanc 1.10 checks only basic credentials: the token reaches it, is not a
    basic login, and is refused as not authorised."""
    orthanc = make_orthanc(users={USER: PASSWORD})
    monkeypatch.setenv("STOW_TEST_TOKEN", PASSWORD)  # even the right password, sent as a token, is no login
    auth = HttpAuth(type="bearer", token_env="STOW_TEST_TOKEN")
    with pytest.raises(SendError) as caught:
        stow_files(instances, _destination(orthanc.dicomweb_url, auth=auth), timeout=60)
    assert (caught.value.kind, caught.value.permanent) == ("not authorised", True)
    assert PASSWORD not in str(caught.value)
    assert orthanc.get("/instances") == []


def test_the_authorization_header(monkeypatch, password_file):
    monkeypatch.setenv("STOW_TEST_TOKEN", "tok.en-123")
    bearer = _authorization(HttpAuth(type="bearer", token_env="STOW_TEST_TOKEN"), "peer")
    assert bearer == "Bearer tok.en-123"
    basic = _authorization(_basic(password_file, "dr-ü"), "peer")
    assert basic.startswith("Basic ")
    assert base64.b64decode(basic[6:]).decode("utf-8") == f"dr-ü:{PASSWORD}"


def test_a_secret_that_cannot_be_read_is_a_local_error(instances, tmp_path, monkeypatch):
    monkeypatch.delenv("STOW_TEST_TOKEN", raising=False)
    destination = _destination(f"http://{LOCALHOST}:{free_port()}/dicom-web",
                               auth=HttpAuth(type="bearer", token_env="STOW_TEST_TOKEN"))
    with pytest.raises(SendError) as caught:
        stow_files(instances, destination, timeout=5)
    assert (caught.value.kind, caught.value.permanent) == ("local error", False)
    assert isinstance(caught.value.__cause__, ConfigError) and "STOW_TEST_TOKEN" in str(caught.value)


def test_nothing_listening_is_a_transient_connection_refused(instances):
    url = f"http://{LOCALHOST}:{free_port()}/dicom-web"
    with pytest.raises(SendError) as caught:
        stow_files(instances, _destination(url), timeout=5)
    assert (caught.value.kind, caught.value.permanent, caught.value.peer) == ("connection refused", False, url)


@pytest.mark.peers
def test_a_url_that_is_not_a_dicomweb_base_is_a_permanent_failure(make_orthanc, instances):
    orthanc = make_orthanc()
    with pytest.raises(SendError) as caught:
        stow_files(instances, _destination(orthanc.url + "/not-dicom-web"), timeout=60)
    assert (caught.value.kind, caught.value.permanent) == ("failure status", True)
    assert "HTTP 404 Not Found" in str(caught.value)
    assert orthanc.get("/instances") == []


@pytest.mark.peers
def test_an_instance_orthanc_cannot_understand_is_named_with_its_failure_reason(make_orthanc, instances, tmp_path):
    """Orthanc answers 400 with the failed instance in FailedSOPSequence (0xC000, no
    StudyInstanceUID) and stores the others."""
    orthanc = make_orthanc()
    broken, broken_uid = _variant(instances[1], tmp_path / "broken", StudyInstanceUID=None)
    accepted = [instances[0], instances[2], instances[3]]
    with pytest.raises(SendError) as caught:
        stow_files([accepted[0], broken, *accepted[1:]], _destination(orthanc.dicomweb_url), timeout=60)
    error = caught.value
    assert (error.kind, error.status, error.permanent) == ("failure status", 0xC000, True)
    assert f"{broken_uid}: 0xC000 (Cannot Understand)" in str(error)
    assert "HTTP 400" in str(error) and "1 of 4" in str(error)
    assert _stored(orthanc) == _uids(accepted)


@pytest.mark.peers
def test_an_instance_orthanc_refuses_is_named_and_the_accepted_ones_are_stored(make_orthanc, instances, tmp_path):
    """A Lua filter refuses the last instance. Plugin 1.7 leaves it out of its answer
    (200, nothing failed); later versions list it as failed with 0x0110. Either way the
    send fails, names it, and may be retried."""
    orthanc = make_orthanc(lua=REFUSING_FILTER)
    refused, refused_uid = _variant(instances[3], tmp_path / "refused", SeriesDescription="REFUSE ME")
    accepted = instances[:3]
    with pytest.raises(SendError) as caught:
        stow_files([*accepted, refused], _destination(orthanc.dicomweb_url), timeout=60)
    error = caught.value
    assert (error.kind, error.permanent) == ("failure status", False)
    assert error.status in (None, 0x0110)
    assert refused_uid in str(error) and "1 of 4" in str(error)
    assert not any(uid in str(error) for uid in _uids(accepted))
    assert _stored(orthanc) == _uids(accepted)


class _TlsFront:
    """TLS on 127.0.0.1 in front of a plain HTTP port, one thread per connection.
    Orthanc's own HTTPS cannot stand in: Debian 12's Orthanc 1.10 crashes (SIGSEGV in
    libcivetweb) on the first TLS handshake."""

    def __init__(self, certificate: Path, key: Path, target_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)
        self.target_port = target_port
        self.listener = socket.create_server((LOCALHOST, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            with self.context.wrap_socket(client, server_side=True) as tls, \
                    socket.create_connection((LOCALHOST, self.target_port)) as plain:
                while True:
                    ready = [tls] if tls.pending() else select.select([tls, plain], [], [], 60)[0]
                    if not ready:
                        return
                    for source in ready:
                        data = source.recv(65536)
                        if not data:
                            return
                        (plain if source is tls else tls).sendall(data)
        except (OSError, ssl.SSLError):  # the client refused our certificate, or hung up
            client.close()

    def close(self) -> None:
        self.listener.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={LOCALHOST}", "-addext", f"subjectAltName=IP:{LOCALHOST}", "-keyout", "key.pem",
                    "-out", "cert.pem"], cwd=folder, check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


@pytest.mark.peers
def test_https_needs_a_certificate_it_can_verify(make_orthanc, instances, tmp_path):
    """A certificate no CA vouches for fails as a transient tls error before anything is
    sent; trusting it through ``ca_certificates`` stores the files."""
    certificate, key = _self_signed(tmp_path)
    orthanc = make_orthanc()
    front = _TlsFront(certificate, key, orthanc.http_port)
    try:
        url = f"https://{LOCALHOST}:{front.port}/dicom-web"
        with pytest.raises(SendError) as caught:
            stow_files(instances, _destination(url), timeout=60)
        assert (caught.value.kind, caught.value.permanent) == ("tls error", False)
        assert "certificate verify failed" in str(caught.value)
        assert orthanc.get("/instances") == []
        outcome = stow_files(instances, _destination(url, ca_certificates=certificate), timeout=60)
        assert outcome.status == 200 and _stored(orthanc) == _uids(instances)
        with pytest.warns(urllib3.exceptions.InsecureRequestWarning):  # verify_tls: false checks nothing
            assert stow_files(instances, _destination(url, verify_tls=False), timeout=60).status == 200
    finally:
        front.close()


# Answers Orthanc 1.10 with plugin 1.7 never gives (warnings, 202, 5xx, 429), told apart
# from hand-made responses.

def _response(status: int, body: bytes = b"", reason: str = "") -> requests.Response:
    response = requests.Response()
    response.status_code, response._content, response.reason = status, body, reason
    return response


def _referenced(uid: str, warning: int | None = None) -> dict:
    item = {"00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def test_warnings_are_returned_in_hex_with_their_meaning():
    body = json.dumps({"00081199": {"vr": "SQ", "Value": [_referenced("1.2.3", 0xB000), _referenced("1.2.4")]}})
    outcome = _outcome(_response(202, body.encode(), "Accepted"), "peer", "peer/studies", ["1.2.3", "1.2.4"], None)
    assert (outcome.status, outcome.warning) == (202, "0xB000 (Coercion of Data Elements)")


def test_an_empty_body_on_200_is_taken_at_its_word():
    assert _outcome(_response(200, b"", "OK"), "peer", "peer/studies", ["1.2.3"], None).status == 200


@pytest.mark.parametrize("status, permanent", [(500, False), (503, False), (429, False), (408, False),
                                               (400, True), (405, True), (409, True), (415, True), (302, True)])
def test_http_failures_without_instance_detail(status, permanent):
    with pytest.raises(SendError) as caught:
        _outcome(_response(status, b"<html>busy</html>", "Reason"), "peer", "peer/studies", ["1.2.3"], None)
    assert (caught.value.kind, caught.value.permanent) == ("failure status", permanent)
    assert f"HTTP {status} Reason" in str(caught.value)


def test_instances_that_failed_only_for_want_of_resources_may_be_retried():
    failed = [{"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [code]}}
              for uid, code in (("1.2.3", 0xA700), ("1.2.4", 0x0110))]
    body = json.dumps({"00081198": {"vr": "SQ", "Value": failed}}).encode()
    with pytest.raises(SendError) as caught:
        _outcome(_response(409, body, "Conflict"), "peer", "peer/studies", ["1.2.3", "1.2.4"], None)
    assert (caught.value.status, caught.value.permanent) == (0xA700, False)
    assert "1.2.3: 0xA700 (Refused: Out of Resources); 1.2.4: 0x0110 (Processing Failure)" in str(caught.value)
