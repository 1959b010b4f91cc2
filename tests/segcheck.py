"""Reading a SEG back with highdicom and checking it against its source series."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom


def check_seg_against_source(seg_path: Path, source_dir: Path) -> hd.seg.Segmentation:
    seg = hd.seg.segread(seg_path)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(source_dir.glob("*.dcm"))]
    source_series = {str(ds.SeriesInstanceUID) for ds in sources}
    positions = {str(ds.SOPInstanceUID): np.asarray(ds.ImagePositionPatient, float) for ds in sources}

    assert seg.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # SEG, Label Map SEG
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.SeriesInstanceUID not in source_series
    referenced = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    assert referenced == source_series
    referenced_instances = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced_instances == set(positions), "every source instance must be referenced"
    assert len(seg.SegmentSequence) >= 1
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position, positions[source_uid], atol=0.01)
    return seg
