"""The C-STORE path decodes only the elements the intake reads (``read_header``): for
every file of the shared data, and for each cut short, what the intake makes of it (the
UIDs, the checks' verdict, the placement) is what it makes of the full decode."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_dataset, read_preamble

from dicom_node.receive.checks import instance_problem
from dicom_node.receive.intake import read_header
from pipeline.input.wholeness import placement_of


def _body(path: Path) -> tuple[bytes, pydicom.uid.UID]:
    """The dataset as a C-STORE carries it (no preamble, no file meta) and its transfer syntax."""
    data = path.read_bytes()
    stream = BytesIO(data)
    read_preamble(stream, False)
    meta = pydicom.filereader._read_file_meta_info(stream)
    return data[stream.tell():], pydicom.uid.UID(meta.TransferSyntaxUID)


def _verdict(decode, body: bytes, syntax: pydicom.uid.UID) -> tuple:
    """What the intake reads of a dataset: UIDs, the checks' refusal, the placement."""
    try:
        ds = decode(body, syntax)
        uids = tuple(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    except Exception as exc:
        return ("undecodable", type(exc).__name__)
    problem = instance_problem(ds, str(syntax))
    return uids, problem and problem.status, placement_of(ds).to_json()


def _full(body: bytes, syntax: pydicom.uid.UID) -> pydicom.Dataset:
    assert not syntax.is_deflated
    return read_dataset(BytesIO(body), syntax.is_implicit_VR, syntax.is_little_endian)


def _header(body: bytes, syntax: pydicom.uid.UID) -> pydicom.Dataset:
    return read_header(BytesIO(body), syntax)


def test_the_header_decode_reads_what_the_full_decode_reads(mri_dir):
    files = sorted(mri_dir.glob("*/*.dcm"))
    assert len(files) > 300
    checked, refused = set(), 0
    for path in files:
        body, syntax = _body(path)
        if syntax.is_deflated:
            continue
        full = _verdict(_full, body, syntax)
        assert full[0] != "undecodable", path
        assert _verdict(_header, body, syntax) == full, path
        checked.add(str(syntax))
        if path.parent.name.startswith("hard_") or path.name.endswith("0001.dcm"):
            for cut in (5000, len(body) // 2, 100):  # a transfer that broke off: refused if the full decode refuses
                if _refused(_verdict(_full, body[:-cut], syntax)):
                    assert _refused(_verdict(_header, body[:-cut], syntax)), (path, cut)
                    refused += 1
    assert len(checked) >= 5, checked  # explicit, implicit, big endian and compressed syntaxes among them
    assert refused >= 20


def _refused(verdict: tuple) -> bool:
    return verdict[0] == "undecodable" or verdict[1] is not None


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "Rows", "ImagePositionPatient"])
def test_the_header_holds_each_element_the_intake_reads(mri_dir, keyword):
    path = sorted((mri_dir / "t1_philips_3t_mprage_sag").glob("*.dcm"))[0]
    body, syntax = _body(path)
    header = _header(body, syntax)
    assert header.get(keyword) == pydicom.dcmread(path).get(keyword)
    assert "PatientName" not in header and "SeriesDescription" not in header  # the rest is skipped
