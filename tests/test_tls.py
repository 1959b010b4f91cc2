"""DICOM TLS with dcmtk peers: our SCP takes a TLS association and refuses a plain one;
our SCU sends to a TLS storescp whose certificate names the host it connects to, and
refuses one that a trusted CA signed for another host (the test's own CA makes both)."""

import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from dicom_node.config import parse_config
from dicom_node.errors import SendError
from dicom_node.send.dimse import send_file
from dicom_node.service import Node
from tests.support.dcmtk import loopback_env, storescu
from tests.support.inprocess import FakeSegmenter
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_for_port, wait_until

# what each certificate the CA signs names: "server" the host the tests connect to,
# "other" another host only (valid, trusted, and not the peer's)
_NAMES = {"server": f"subjectAltName=IP:{LOCALHOST},DNS:localhost", "other": "subjectAltName=DNS:pacs.example",
          "client": None}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)
    for name, names in _NAMES.items():
        common = "pacs.example" if name == "other" else name
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=folder)
        extensions = []
        if names:
            (folder / f"{name}.ext").write_text(names + "\n")
            extensions = ["-extfile", f"{name}.ext"]
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.crt", *extensions, cwd=folder)
    return folder


def _tls_args(pki: Path, name: str) -> list[str]:
    return ["+tls", str(pki / f"{name}.key"), str(pki / f"{name}.crt"), "+cf", str(pki / "ca.crt")]


@pytest.mark.peers
def test_tls_association_succeeds_and_plain_one_fails(scp, pki, t1_dir):
    server = scp(node={"tls": {"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
                               "ca_certificates": str(pki / "ca.crt"), "require_client_certificate": True}})
    port = str(server.settings.port)
    files = [str(p) for p in sorted(t1_dir.glob("*.dcm"))[:2]]
    secure = subprocess.run(["storescu", *_tls_args(pki, "client"), "-aet", "MODALITY", "-aec", "DICOMNODE",
                             LOCALHOST, port, *files], capture_output=True, text=True, timeout=60)
    assert secure.returncode == 0, secure.stderr
    assert server.state.instance_count(str(pydicom.dcmread(files[0]).SeriesInstanceUID)) == 2
    plain = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", LOCALHOST, port, files[0]],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0


@pytest.fixture
def tls_storescp(pki, tmp_path):
    """``start(certificate)``: a TLS storescp on 127.0.0.1 presenting ``certificate``
    (``server``: it names 127.0.0.1; ``other``: pacs.example only); its output folder."""
    started = []

    def start(certificate: str) -> SimpleNamespace:
        port = free_port()
        out = tmp_path / f"out-{certificate}-{port}"
        out.mkdir()
        process = subprocess.Popen(["storescp", *_tls_args(pki, certificate), "-od", str(out), str(port)],
                                   env=loopback_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        wait_for_port(port, process=process)
        return SimpleNamespace(port=port, out=out, ae_title="ANY")

    yield start
    for process in started:
        process.terminate()
        process.wait()


def _tls_destination(pki: Path, port: int, folder: Path, **tls):
    return parse_config({"destination": {"ae_title": "ANY", "host": LOCALHOST, "port": port, "tls": {
        "certificate": str(pki / "client.crt"), "private_key": str(pki / "client.key"),
        "ca_certificates": str(pki / "ca.crt"), **tls}}}, folder).destinations[0]


@pytest.mark.peers
def test_scu_sends_over_tls(pki, t1_dir, tmp_path, tls_storescp):
    """The certificate names 127.0.0.1, the host the SCU connects to: the name check passes."""
    peer = tls_storescp("server")
    send_file(sorted(t1_dir.glob("*.dcm"))[0], _tls_destination(pki, peer.port, tmp_path), calling_ae_title="DICOMNODE")
    assert len(list(peer.out.iterdir())) == 1


@pytest.mark.peers
def test_scu_refuses_a_trusted_certificate_for_another_host(pki, t1_dir, tmp_path, tls_storescp):
    """Signed by the CA the destination trusts, valid, and for pacs.example only: the send
    fails as a tls error naming the mismatch, and nothing is stored; the documented
    opt-out (tls.check_hostname: false, with a CA of the site's own) lets it through."""
    peer = tls_storescp("other")
    instance = sorted(t1_dir.glob("*.dcm"))[0]
    with pytest.raises(SendError) as refused:
        send_file(instance, _tls_destination(pki, peer.port, tmp_path), calling_ae_title="DICOMNODE", timeout=10)
    assert (refused.value.kind, refused.value.permanent) == ("tls error", False)
    assert f"mismatch, certificate is not valid for '{LOCALHOST}'" in str(refused.value)  # IP address mismatch
    assert not list(peer.out.iterdir())
    send_file(instance, _tls_destination(pki, peer.port, tmp_path, check_hostname=False), calling_ae_title="DICOMNODE")
    assert len(list(peer.out.iterdir())) == 1


@pytest.mark.peers
def test_the_node_records_the_hostname_refusal_in_the_outbox_and_warns_once_of_an_insecure_destination(
        pki, t1_dir, tmp_path, tls_storescp, caplog):
    """A running node: its send to the TLS peer whose certificate names another host is
    recorded with the reason; a DICOMweb destination with basic auth over http://,
    allowed by allow_insecure, is named in one warning at start and in none after."""
    peer = tls_storescp("other")
    (tmp_path / "archive.password").write_text("archive-secret\n")
    tls = {"certificate": str(pki / "client.crt"), "private_key": str(pki / "client.key"),
           "ca_certificates": str(pki / "ca.crt")}
    archive = {"name": "archive", "protocol": "dicomweb", "url": f"http://{LOCALHOST}:{free_port()}/dicom-web",
               "allow_insecure": True, "auth": {"type": "basic", "username": "node", "password_file": "archive.password"}}
    node = Node(parse_config({
        "node": {"port": free_port()},
        "security": {"allowed_callers": [{"ae_title": "MODALITY"}]},
        "destinations": [{"name": "pacs", "ae_title": "ANY", "host": LOCALHOST, "port": peer.port, "tls": tls}, archive],
        "storage": {"min_free_bytes": 1_000_000},
        "completion": {"stable_seconds": 1},
        "send": {"retry_delay_seconds": 60, "timeout_seconds": 10},
        "http": {"port": 0},
    }, tmp_path), segmenter=FakeSegmenter())
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        node.start()
        try:
            storescu(node.config.node.port, sorted(t1_dir.glob("*.dcm")))
            row = wait_until(lambda: [item for job in node.state.jobs() for item in node.state.outbox(job.id)
                                      if item.destination == "pacs" and item.attempts], 60, 0.2,
                             "a send attempt to pacs")[0]
            wait_until(lambda: [item for job in node.state.jobs() for item in node.state.outbox(job.id)
                                if item.destination == "archive" and item.attempts], 60, 0.2, "an attempt to archive")
        finally:
            node.stop()
    assert "tls error" in row.last_error and f"certificate is not valid for '{LOCALHOST}'" in row.last_error, row.last_error
    assert not list(peer.out.iterdir())
    warnings = [r.getMessage() for r in caplog.records if "insecure" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "archive" in warnings[0] and "http://" in warnings[0] and "archive-secret" not in caplog.text
