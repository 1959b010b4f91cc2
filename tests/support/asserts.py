"""Assertions on what a StoreSCP received, counted per C-STORE so that a second delivery
of the same SOP instance shows; each failure lists everything that arrived."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pydicom

from tests.support.dcmtk import StoreSCP


def series_uid_of(path: Path) -> str:
    """The SeriesInstanceUID of a DICOM file, or of the first file in a folder."""
    if path.is_dir():
        path = sorted(path.glob("*.dcm"))[0]
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


class Reception(NamedTuple):
    """One C-STORE received by a StoreSCP: its file and its header (read without pixels)."""

    path: Path
    dataset: pydicom.Dataset


def _describe(receptions: list[Reception]) -> str:
    lines = []
    for number, (path, ds) in enumerate(receptions, start=1):
        referenced = ds.get("ReferencedSeriesSequence")
        source = str(referenced[0].SeriesInstanceUID) if referenced else "-"
        lines.append(f"  {number}. {path.name}: Modality {ds.get('Modality')}, SOPInstanceUID"
                     f" {ds.get('SOPInstanceUID')}, source series {source}, {path.stat().st_size} bytes")
    return "\n".join(lines) or "  (none)"


def seg_receptions(scp: StoreSCP, series_instance_uid: str | None = None) -> list[Reception]:
    """The SEGs ``scp`` received, one per C-STORE in arrival order, optionally only those
    whose source series (ReferencedSeriesSequence[0]) is ``series_instance_uid``."""
    found = []
    for path in scp.receptions():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("Modality") != "SEG":
            continue
        if series_instance_uid is not None:
            referenced = ds.get("ReferencedSeriesSequence")
            if not referenced or str(referenced[0].SeriesInstanceUID) != series_instance_uid:
                continue
        found.append(Reception(path, ds))
    return found


def assert_exactly_one_seg(scp: StoreSCP, series_instance_uid: str | None = None) -> Reception:
    """The one SEG ``scp`` received (for ``series_instance_uid``, if given); a duplicate
    delivery of the same SOP instance counts as a second SEG."""
    scp.settle()
    segs = seg_receptions(scp, series_instance_uid)
    if len(segs) != 1:
        scope = f" for series {series_instance_uid}" if series_instance_uid else ""
        everything = [Reception(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in scp.receptions()]
        raise AssertionError(
            f"expected exactly one SEG{scope} at {scp.ae_title}, got {len(segs)};"
            f" every C-STORE it received, in arrival order:\n{_describe(everything)}"
        )
    return segs[0]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information, which storescp fills in per association
    (the sender's AE title in SourceApplicationEntityTitle) rather than per object."""
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path.name}: no file meta group length where storescp writes it")
    return data[144 + int.from_bytes(data[140:144], "little"):]


def assert_no_conflicting_duplicates(scp: StoreSCP) -> None:
    """Fail if one SOPInstanceUID arrived more than once with different content."""
    scp.settle()
    by_uid: dict[str, list[Path]] = {}
    for path in scp.receptions():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        by_uid.setdefault(uid, []).append(path)
    conflicts = [
        f"  SOPInstanceUID {uid}: " + ", ".join(f"{p.name} ({p.stat().st_size} bytes)" for p in paths)
        for uid, paths in by_uid.items()
        if len({_dataset_bytes(p) for p in paths}) > 1
    ]
    if conflicts:
        raise AssertionError(f"{scp.ae_title} received different objects under the same SOPInstanceUID:\n"
                             + "\n".join(conflicts))
