"""Series assembly: from instance files to a sorted, validated ``Series``.

Only classic single-frame MR images form the volume; other objects of the series (raw
data, secondary captures, presentation states) stay on disk but are left out. The
geometry is checked before any model runs, each failure with a specific reason:
one orientation, no repeated slice positions, equal rows/columns/pixel spacing,
uniform slice spacing (a gap is named with its position and size), enough slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import SeriesError

__all__ = [
    "MR_IMAGE_STORAGE",
    "ENHANCED_MR_IMAGE_STORAGE",
    "Slice",
    "Series",
    "read_headers",
    "assemble_series",
    "load_series",
]

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")

_ORIENTATION_TOLERANCE = 1e-3  # direction cosines
_SPACING_TOLERANCE = 0.01  # fraction of the nominal slice spacing


@dataclass(frozen=True)
class Slice:
    """One source image of the volume, in slice order."""

    path: Path
    sop_instance_uid: str
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    distance: float  # along the slice normal, mm
    header: pydicom.Dataset  # the instance without its pixel data, read once


@dataclass(frozen=True)
class Series:
    """A geometrically valid stack of single-frame MR images, sorted along the normal."""

    study_instance_uid: str
    series_instance_uid: str
    slices: tuple[Slice, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_spacing: float
    ignored: tuple[Path, ...]  # instances of the series that are not part of the volume
    header: pydicom.Dataset  # the first slice's header, without pixel data

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise SeriesError(f"cannot read {path.name}: {exc}") from exc


def read_headers(paths: Sequence[Path]) -> list[tuple[Path, pydicom.Dataset]]:
    """Every instance's header (no pixel data), read once for all later stages."""
    return [(path, _read_header(path)) for path in paths]


def load_series(paths: Sequence[Path], *, min_slices: int = 3) -> Series:
    """Read headers, keep the MR images, sort them and check their geometry."""
    return assemble_series(read_headers(paths), min_slices=min_slices)


def assemble_series(headers: Sequence[tuple[Path, pydicom.Dataset]], *, min_slices: int = 3) -> Series:
    """Keep the MR images, sort them along their normal and check their geometry."""
    if not headers:
        raise SeriesError("the series has no instances")
    images = [(p, ds) for p, ds in headers if ds.get("SOPClassUID") == MR_IMAGE_STORAGE]
    ignored = tuple(p for p, ds in headers if ds.get("SOPClassUID") != MR_IMAGE_STORAGE)
    if not images:
        if any(ds.get("SOPClassUID") == ENHANCED_MR_IMAGE_STORAGE for _, ds in headers):
            raise SeriesError("Enhanced MR multi-frame series are stored but not yet assembled into volumes")
        classes = sorted({str(getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID"))) for _, ds in headers})
        raise SeriesError(f"no MR image in the series (only {', '.join(classes)})")

    first = images[0][1]
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        missing = [p.name for p, ds in images if key not in ds]
        if missing:
            raise SeriesError(f"{len(missing)} image(s) lack {key}, e.g. {missing[0]}")

    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for path, ds in images:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation,
                           atol=_ORIENTATION_TOLERANCE):
            raise SeriesError(
                "not a single-orientation volume: images have different ImageOrientationPatient"
                f" (e.g. {path.name})"
            )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SeriesError(f"images differ in size: {ds.Rows}x{ds.Columns} vs {first.Rows}x{first.Columns}")
        if not np.allclose(np.asarray(ds.PixelSpacing, float), np.asarray(first.PixelSpacing, float), atol=1e-4):
            raise SeriesError("images differ in PixelSpacing")

    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices = sorted(
        (
            Slice(
                path=p,
                sop_instance_uid=str(ds.SOPInstanceUID),
                position=tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
                distance=float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))),
                header=ds,
            )
            for p, ds in images
        ),
        key=lambda s: s.distance,
    )
    if len(slices) < min_slices:
        raise SeriesError(f"only {len(slices)} slice(s); at least {min_slices} are needed for a volume")
    steps = np.diff([s.distance for s in slices])
    if np.any(steps < 1e-3):
        repeats = int(np.sum(steps < 1e-3))
        raise SeriesError(
            f"{repeats} repeated slice position(s): a 4D series (dynamics, echoes or time points),"
            " not a single 3D volume"
        )
    spacing = float(np.median(steps))
    off = np.abs(steps - spacing) > _SPACING_TOLERANCE * spacing
    if np.any(off):
        index = int(np.argmax(off))
        raise SeriesError(
            f"non-uniform slice spacing: a gap of {steps[index]:.2f} mm after slice {index + 1}"
            f" of {len(slices)} (at {slices[index].distance:.2f} mm along the normal) where"
            f" {spacing:.2f} mm is expected; a slice is probably missing"
        )
    return Series(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        slices=tuple(slices),
        rows=int(first.Rows),
        columns=int(first.Columns),
        pixel_spacing=(float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        row_direction=tuple(float(v) for v in row_dir),  # type: ignore[arg-type]
        column_direction=tuple(float(v) for v in col_dir),  # type: ignore[arg-type]
        slice_spacing=spacing,
        ignored=ignored,
        header=first,
    )
