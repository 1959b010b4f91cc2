"""Series derived by the tests from a real one, for shapes the shared data lacks:
the same T1 as one Legacy Converted Enhanced MR object, and as a two-echo classic series."""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.uid import generate_uid


def legacy_converted(source_dir: Path, out_dir: Path) -> Path:
    """The single-frame series as one Legacy Converted Enhanced MR Image (one frame per slice)."""
    datasets = [pydicom.dcmread(p) for p in sorted(source_dir.glob("*.dcm"))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intended person name")
        converted = hd.legacy.LegacyConvertedEnhancedMRImage(
            datasets,
            series_instance_uid=generate_uid(),
            series_number=77,
            sop_instance_uid=generate_uid(),
            instance_number=1,
        )
    # Drop the originals' references to their localizers: kept, they would need a
    # ReferencedImageEvidenceSequence, and the object would not pass dciodvfy.
    del converted.SharedFunctionalGroupsSequence[0].ReferencedImageSequence
    if "ReferencedSeriesSequence" in converted:
        del converted.ReferencedSeriesSequence
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "legacy_converted.dcm"
    converted.save_as(path, enforce_file_format=True)
    return path


def two_echoes(source_dir: Path, out_dir: Path) -> tuple[list[Path], list[Path]]:
    """The series again as a second echo in the same series: (echo 1 files, echo 2 files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    echoes: tuple[list[Path], list[Path]] = ([], [])
    for index, path in enumerate(sorted(source_dir.glob("*.dcm"))):
        for echo, files in enumerate(echoes, start=1):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.EchoNumbers = echo
            ds.EchoTime = float(ds.EchoTime) * echo
            ds.InstanceNumber = index + 1 + 1000 * (echo - 1)
            if echo == 2:
                ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
            target = out_dir / f"echo{echo}_{index:03d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            files.append(target)
    return echoes


def copy_series(source_dir: Path, out_dir: Path, seed: str) -> list[Path]:
    """The series with new Study, Series, Frame of Reference and SOP Instance UIDs (derived
    from ``seed``, so a test can make several independent copies of one real series)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = (generate_uid(entropy_srcs=[seed, what]) for what in ("study", "series", "frame"))
    paths = []
    for path in sorted(source_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[seed, path.name])
        target = out_dir / path.name
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths
