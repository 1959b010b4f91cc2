"""DICOM TLS with dcmtk peers: our SCP takes a TLS association and refuses a plain one;
our SCU sends to a TLS storescp."""

import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import parse_config
from dicom_node.send.dimse import send_file
from tests.support.dcmtk import loopback_env
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_for_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.crt", cwd=folder)
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


@pytest.mark.peers
def test_scu_sends_over_tls(pki, t1_dir, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    receiver = subprocess.Popen(["storescp", *_tls_args(pki, "server"), "-od", str(out), str(port)],
                                env=loopback_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=receiver)
        config = parse_config({"destination": {"ae_title": "ANY", "host": LOCALHOST, "port": port, "tls": {
            "certificate": str(pki / "client.crt"), "private_key": str(pki / "client.key"),
            "ca_certificates": str(pki / "ca.crt")}}}, tmp_path)
        send_file(sorted(t1_dir.glob("*.dcm"))[0], config.destinations[0], calling_ae_title="DICOMNODE")
    finally:
        receiver.terminate()
        receiver.wait()
    assert len(list(out.iterdir())) == 1
