"""The counting storage SCP that every "exactly one SEG" claim rests on: a planted
duplicate delivery must show, however identical its bytes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.asserts import assert_exactly_one_seg, assert_no_conflicting_duplicates, seg_receptions
from tests.support.dcmtk import StoreSCP, storescu

pytestmark = pytest.mark.peers


def _seg_like(t1_dir: Path, target: Path, description: str = "Auto SEG") -> Path:
    """An MR instance dressed as a SEG of the t1 series: Modality SEG, a new
    SOPInstanceUID and the source series in ReferencedSeriesSequence."""
    ds = pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0])
    source = Dataset()
    source.SeriesInstanceUID = ds.SeriesInstanceUID
    ds.ReferencedSeriesSequence = [source]
    ds.Modality = "SEG"
    ds.SeriesDescription = description
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(target.parent), "series"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[str(target.parent), "instance"])
    ds.save_as(target)
    return target


def _send(scp: StoreSCP, paths: list[Path], calling: str = "MODALITY") -> None:
    storescu(scp.port, paths, called=scp.ae_title, calling=calling)


def _source_series(t1_dir: Path) -> str:
    return str(pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0], stop_before_pixels=True).SeriesInstanceUID)


def test_a_single_send_is_one_reception(storescp, t1_dir, tmp_path):
    seg = _seg_like(t1_dir, tmp_path / "seg.dcm")
    _send(storescp, [seg])
    assert len(storescp.receptions()) == 1
    assert storescp.received() == storescp.receptions()
    path, ds = assert_exactly_one_seg(storescp, _source_series(t1_dir))
    assert ds.SOPInstanceUID == pydicom.dcmread(seg).SOPInstanceUID and path.parent == storescp.folder
    assert seg_receptions(storescp, "1.2.3.4") == []
    with pytest.raises(AssertionError, match="for series 1.2.3.4 at PACS, got 0"):
        assert_exactly_one_seg(storescp, "1.2.3.4")
    assert_no_conflicting_duplicates(storescp)


def test_a_planted_duplicate_delivery_is_counted(storescp, t1_dir, tmp_path):
    seg = _seg_like(t1_dir, tmp_path / "seg.dcm")
    _send(storescp, [seg])
    _send(storescp, [seg], calling="RESENDER")  # a second association, from another AE title
    receptions = storescp.receptions()
    assert len(receptions) == 2
    assert len({str(pydicom.dcmread(p).SOPInstanceUID) for p in receptions}) == 1, "one instance, twice"
    assert len(seg_receptions(storescp, _source_series(t1_dir))) == 2
    with pytest.raises(AssertionError, match="got 2") as failure:
        assert_exactly_one_seg(storescp)
    assert all(p.name in str(failure.value) for p in receptions), "the message lists every reception"
    # storescp writes the dataset it received: the same object gives the same bytes,
    # and only the file meta information (the sender's AE title) differs
    assert receptions[0].read_bytes() != receptions[1].read_bytes()
    assert_no_conflicting_duplicates(storescp)


def test_receptions_keep_arrival_order_within_and_across_associations(storescp, t1_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _seg_like(t1_dir, tmp_path / "a" / "seg.dcm", "first")
    second = _seg_like(t1_dir, tmp_path / "b" / "seg.dcm", "second")
    _send(storescp, [first, second, first])  # one association; storescu sends in this order
    _send(storescp, [second])
    order = [str(pydicom.dcmread(p).SeriesDescription) for p in storescp.receptions()]
    assert order == ["first", "second", "first", "second"]


def test_one_sop_instance_with_different_content_is_a_conflict(storescp, t1_dir, tmp_path):
    seg = _seg_like(t1_dir, tmp_path / "seg.dcm")
    changed = pydicom.dcmread(seg)
    changed.SeriesDescription = "Auto SEG, changed"
    changed.save_as(tmp_path / "changed.dcm")
    _send(storescp, [seg])
    _send(storescp, [tmp_path / "changed.dcm"])
    with pytest.raises(AssertionError, match="different objects under the same SOPInstanceUID"):
        assert_no_conflicting_duplicates(storescp)
