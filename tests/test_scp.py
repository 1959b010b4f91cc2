"""The SCP with real clients: dcmtk echoscu/storescu and pynetdicom (for a second source address)."""

import shutil
import subprocess

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification


def _associate(port, calling="MODALITY", bind="127.0.0.1"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(bind, 0))


@pytest.mark.peers
def test_known_caller_echoes(scp):
    server = scp()
    assert subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(server.settings.port)]).returncode == 0


@pytest.mark.peers
def test_unknown_calling_ae_is_rejected(scp):
    server = scp()
    result = subprocess.run(["echoscu", "-aet", "STRANGER", "127.0.0.1", str(server.settings.port)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assoc = _associate(server.settings.port, calling="STRANGER")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x03


def test_known_ae_from_the_wrong_host_is_rejected(scp):
    server = scp()
    assoc = _associate(server.settings.port, bind="127.0.0.2")
    assert assoc.is_rejected
    assoc = _associate(server.settings.port, bind="127.0.0.1")
    assert assoc.is_established
    assoc.release()


def test_a_path_like_uid_never_becomes_a_path_and_fails_with_a_status(scp, t1_dir, tmp_path):
    server = scp()
    ds = pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0])
    ds.SeriesInstanceUID = "../../etc/passwd"
    assoc = _associate(server.settings.port)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210
    assert not (tmp_path / "etc").exists()
    assert not any(p.is_file() for p in (tmp_path / "spool" / "incoming").rglob("*"))


def test_below_the_disk_threshold_store_answers_out_of_resources(scp, t1_dir):
    server = scp(storage={"min_free_bytes": shutil.disk_usage("/").total * 2})
    ds = pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0])
    assoc = _associate(server.settings.port)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA700
    assert server.state.instance_count(str(ds.SeriesInstanceUID)) == 0
