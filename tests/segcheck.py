"""Reading a SEG back with highdicom and checking it against its source series.

The source side is read here independently of the pipeline: classic images by their
ImagePositionPatient, multi-frame images frame by frame from their per-frame groups.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

MR_IMAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")


def source_positions(sources: list[pydicom.Dataset]) -> dict[tuple[str, int | None], np.ndarray]:
    """(SOPInstanceUID, frame number or None) -> ImagePositionPatient of every image plane."""
    positions = {}
    for ds in sources:
        if "PerFrameFunctionalGroupsSequence" in ds:
            for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                position = frame.PlanePositionSequence[0].ImagePositionPatient
                positions[(str(ds.SOPInstanceUID), number)] = np.asarray(position, float)
        else:
            positions[(str(ds.SOPInstanceUID), None)] = np.asarray(ds.ImagePositionPatient, float)
    return positions


def referenced_planes(frame: pydicom.Dataset) -> list[tuple[str, int | None]]:
    """The source planes one SEG frame names in its DerivationImageSequence."""
    planes = []
    for derivation in frame.DerivationImageSequence:
        for item in derivation.SourceImageSequence:
            number = item.get("ReferencedFrameNumber")
            planes.append((str(item.ReferencedSOPInstanceUID), None if number is None else int(number)))
    return planes


def check_seg_against_source(
    seg_path: Path, source_dir: Path, *, sources: list[Path] | None = None
) -> hd.seg.Segmentation:
    """The SEG's identity, references and every frame's position against its source.

    ``sources`` names the files the volume was built from when not every image of the
    folder was used (one volume of a 4D series)."""
    seg = hd.seg.segread(seg_path)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources or sorted(source_dir.glob("*.dcm"))]
    images = [ds for ds in headers if ds.SOPClassUID in MR_IMAGE_CLASSES]
    source_series = {str(ds.SeriesInstanceUID) for ds in images}
    positions = source_positions(images)

    assert seg.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # SEG, Label Map SEG
    assert seg.StudyInstanceUID == images[0].StudyInstanceUID
    assert seg.PatientID == images[0].PatientID
    assert seg.SeriesInstanceUID not in source_series
    referenced = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    assert referenced == source_series
    referenced_instances = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced_instances == {uid for uid, _ in positions}, "every source image must be referenced"
    assert len(seg.SegmentSequence) >= 1
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        planes = referenced_planes(frame)
        assert len(planes) == 1, f"SEG frame {index} references {len(planes)} source planes, not one"
        assert planes[0] in positions, f"SEG frame {index} references {planes[0]}, not a source plane"
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position, positions[planes[0]], atol=0.01)
    return seg
