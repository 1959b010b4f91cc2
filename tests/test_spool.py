import pytest

from dicom_node.errors import InvalidUIDError
from dicom_node.store.spool import Spool, validate_uid


@pytest.mark.parametrize(
    "uid",
    ["../../etc/passwd", "1.2/3.4", "1.2.840..1", "1.02.3", "", "1", "1.2.3 ", "1." + "1" * 70, None, "1.2.a"],
)
def test_invalid_uids_are_refused(uid):
    with pytest.raises(InvalidUIDError):
        validate_uid(uid)


def test_valid_uid_passes():
    assert validate_uid("1.2.840.10008.5.1.4.1.1.4") == "1.2.840.10008.5.1.4.1.1.4"


def test_instances_are_written_atomically_into_study_and_series_folders(tmp_path):
    spool = Spool(tmp_path)
    path = spool.store_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM")
    assert path == tmp_path / "incoming" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"DICM"
    assert list(spool.tmp.iterdir()) == []


def test_a_bad_uid_never_becomes_a_path(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUIDError):
        spool.store_instance("1.2.3", "../../etc", "1.2.3.4.5", b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
