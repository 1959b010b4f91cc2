"""Series assembly: from instance files to a sorted, validated ``Series``.

MR images form the volume: classic single-frame MR, and the frames of Enhanced MR and
Legacy Converted Enhanced MR multi-frame objects, read frame by frame from their
per-frame (falling back to shared) functional groups. Every image plane, whichever
object it came from, becomes one candidate ``Slice``; from then on both kinds take the
same path. Other objects of the series (raw data, secondary captures, presentation
states) stay on disk but are left out.

The geometry is checked before any model runs, each failure with a specific reason:
one orientation; no repeated slice positions (a 4D series: dynamics, echoes, time
points) unless ``four_d`` selects one volume; equal rows, columns and pixel spacing;
uniform slice spacing (a gap is named with its position and size); enough slices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import SeriesError, TooFewSlicesError

if TYPE_CHECKING:  # the setting's closed set, for annotations only (the settings import this package)
    from pipeline.settings import FourD

__all__ = [
    "MR_IMAGE_STORAGE",
    "ENHANCED_MR_IMAGE_STORAGE",
    "LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE",
    "MR_IMAGE_CLASSES",
    "Slice",
    "Series",
    "read_headers",
    "assemble_series",
    "load_series",
]

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.4")
MULTI_FRAME_MR_CLASSES = (ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE)
MR_IMAGE_CLASSES = (MR_IMAGE_STORAGE, *MULTI_FRAME_MR_CLASSES)

"""What to do with repeated slice positions: reject the series, or take the first or
the last image at every position (ordered by the fields that tell the volumes apart)."""

_ORIENTATION_TOLERANCE = 1e-3  # direction cosines
_SPACING_TOLERANCE = 0.01  # fraction of the nominal slice spacing
_SAME_POSITION_MM = 1e-3  # along the normal

# Fields that tell the volumes of a classic 4D series apart, in the order they sort them.
_CLASSIC_VOLUME_FIELDS = (
    "TemporalPositionIdentifier",
    "EchoNumbers",
    "EchoTime",
    "InversionTime",
    "TriggerTime",
    "DiffusionBValue",
    "ImageType",
    "AcquisitionNumber",
)
# Dimension indices that place a frame in space rather than in a volume.
_SPATIAL_DIMENSIONS = {0x00209056, 0x00209057, 0x00200032}  # StackID, InStackPositionNumber, ImagePositionPatient


@dataclass(frozen=True)
class Slice:
    """One image plane of the volume, in slice order: a classic instance or one frame."""

    path: Path
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame instance; None for single-frame
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    distance: float  # along the slice normal, mm
    rescale: tuple[float, float]  # (slope, intercept) of this plane's modality LUT
    header: pydicom.Dataset  # the instance without its pixel data, read once


@dataclass(frozen=True)
class Series:
    """A geometrically valid stack of MR image planes, sorted along the normal."""

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
    selection: str | None = None  # how one volume was taken from a 4D series, if it was

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def multi_frame(self) -> bool:
        return self.slices[0].frame_number is not None


@dataclass(frozen=True)
class _Plane:
    """A candidate slice with everything the checks need."""

    slice: Slice
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    volume_fields: dict[str, Any]  # values that may tell volumes of a 4D series apart


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise SeriesError(f"cannot read {path.name}: {exc}") from exc


def read_headers(paths: Sequence[Path]) -> list[tuple[Path, pydicom.Dataset]]:
    """Every instance's header (no pixel data), read once for all later stages."""
    return [(path, _read_header(path)) for path in paths]


def load_series(paths: Sequence[Path], *, min_slices: int = 3, four_d: FourD = "reject") -> Series:
    """Read headers, keep the MR images, sort them and check their geometry."""
    return assemble_series(read_headers(paths), min_slices=min_slices, four_d=four_d)


def _floats(value: Any, count: int, what: str, where: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where} has an unreadable {what}: {value!r}") from exc
    if len(values) != count:
        raise SeriesError(f"{where} has {len(values)} values of {what}, not {count}")
    return values


def _plain(value: Any) -> Any:
    """A header value as something hashable and sortable (numbers before text)."""
    if value is None:
        return (0, "")
    if isinstance(value, (int, float)):
        return (1, float(value))
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return (2, "\\".join(str(v) for v in value))
    try:
        return (1, float(value))
    except (TypeError, ValueError):
        return (2, str(value))


def _classic_plane(path: Path, ds: pydicom.Dataset) -> _Plane:
    where = path.name
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if key not in ds:
            raise SeriesError(f"image {where} lacks {key}")
    position = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where)
    return _Plane(
        slice=Slice(
            path=path,
            sop_instance_uid=str(ds.SOPInstanceUID),
            frame_number=None,
            position=position,  # type: ignore[arg-type]
            distance=0.0,
            rescale=(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)),
            header=ds,
        ),
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        volume_fields={name: ds.get(name) for name in _CLASSIC_VOLUME_FIELDS},
    )


def _group_item(ds: pydicom.Dataset, frame: pydicom.Dataset | None, group: str) -> pydicom.Dataset | None:
    """A functional group's item for one frame: per-frame first, then shared."""
    for groups in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is not None and group in groups and len(groups[group].value) > 0:
            return groups[group][0]
    return None


def _frame_value(ds: pydicom.Dataset, frame: pydicom.Dataset | None, group: str, keyword: str) -> Any:
    item = _group_item(ds, frame, group)
    return None if item is None else item.get(keyword)


def _dimension_names(ds: pydicom.Dataset) -> list[str | None]:
    """For each entry of DimensionIndexValues, the name of a non-spatial dimension (or None)."""
    names: list[str | None] = []
    for item in ds.get("DimensionIndexSequence") or []:
        pointer = int(item.DimensionIndexPointer)
        if pointer in _SPATIAL_DIMENSIONS:
            names.append(None)
        else:
            names.append(keyword_for_tag(pointer) or f"({pointer >> 16:04X},{pointer & 0xFFFF:04X})")
    return names


def _multi_frame_planes(path: Path, ds: pydicom.Dataset) -> list[_Plane]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise SeriesError(f"{path.name} has {frames} frames but {len(per_frame)} per-frame functional groups")
    dimensions = _dimension_names(ds)
    planes = []
    for number, frame in enumerate(per_frame, start=1):
        where = f"frame {number} of {path.name}"
        position = _frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        for what, value in (
            ("ImagePositionPatient", position),
            ("ImageOrientationPatient", orientation),
            ("PixelSpacing", spacing),
        ):
            if value is None:
                raise SeriesError(f"{where} lacks {what} in its functional groups")
        slope = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        # The scanner's own dimensions order the volumes first; then time, echo, frame type.
        fields: dict[str, Any] = {}
        indices = _frame_value(ds, frame, "FrameContentSequence", "DimensionIndexValues")
        if indices is not None:
            values = list(indices) if isinstance(indices, (list, pydicom.multival.MultiValue)) else [indices]
            fields.update((name, value) for name, value in zip(dimensions, values) if name is not None)
        fields.setdefault(
            "TemporalPositionIndex", _frame_value(ds, frame, "FrameContentSequence", "TemporalPositionIndex")
        )
        fields.setdefault("EffectiveEchoTime", _frame_value(ds, frame, "MREchoSequence", "EffectiveEchoTime"))
        fields.setdefault("FrameType", _frame_value(ds, frame, "MRImageFrameTypeSequence", "FrameType"))
        planes.append(
            _Plane(
                slice=Slice(
                    path=path,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    frame_number=number,
                    position=_floats(position, 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
                    distance=0.0,
                    rescale=(float(slope if slope is not None else 1), float(intercept or 0)),
                    header=ds,
                ),
                orientation=_floats(orientation, 6, "ImageOrientationPatient", where),
                pixel_spacing=_floats(spacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                volume_fields=fields,
            )
        )
    return planes


def _describe_plane(plane: _Plane) -> str:
    s = plane.slice
    return s.path.name if s.frame_number is None else f"frame {s.frame_number} of {s.path.name}"


def _check_planes(planes: list[_Plane]) -> None:
    """One frame of reference, one orientation, one size, one pixel spacing: checked from
    the headers, before any pixel is decoded or a model runs."""
    first = planes[0]
    frames_of_reference = sorted({str(p.slice.header.get("FrameOfReferenceUID", "")) for p in planes})
    if len(frames_of_reference) > 1:
        shown = ", ".join(uid or "(none)" for uid in frames_of_reference[:3])
        raise SeriesError(
            f"the images lie in {len(frames_of_reference)} frames of reference (FrameOfReferenceUID {shown}):"
            " one volume needs one"
        )
    for plane in planes[1:]:
        if not np.allclose(plane.orientation, first.orientation, atol=_ORIENTATION_TOLERANCE):
            raise SeriesError(
                "not a single-orientation volume: images have different ImageOrientationPatient"
                f" (e.g. {_describe_plane(plane)})"
            )
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise SeriesError(
                f"images differ in size (Rows x Columns): {plane.rows}x{plane.columns} ({_describe_plane(plane)})"
                f" vs {first.rows}x{first.columns}"
            )
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise SeriesError(f"images differ in PixelSpacing ({_describe_plane(plane)})")


def _one_volume(positions: list[list[_Plane]], four_d: FourD) -> tuple[list[_Plane], str | None]:
    """One plane per position: the only one, or the first/last of a 4D series."""
    counts = sorted({len(group) for group in positions})
    if counts == [1]:
        return [group[0] for group in positions], None
    repeated = sum(1 for group in positions if len(group) > 1)
    images = f"{counts[-1]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    varying = [
        name
        for name in positions[0][0].volume_fields
        if any(len({_plain(p.volume_fields.get(name)) for p in group}) > 1 for group in positions)
    ]
    what = f"varying {', '.join(varying)}" if varying else "nothing in the headers tells the volumes apart"
    if four_d == "reject":
        raise SeriesError(
            f"{repeated} repeated slice position(s), {images} images at each: a 4D series (dynamics,"
            f" echoes or time points; {what}), not a single 3D volume; set pipeline.four_d to 'first'"
            " or 'last' to take one volume of it"
        )
    if len(counts) > 1:
        raise SeriesError(
            f"{repeated} repeated slice position(s) with {images} images each:"
            " an incomplete 4D series, no complete volume can be taken from it"
        )
    if not varying:
        raise SeriesError(
            f"{repeated} repeated slice position(s) but {what}: cannot choose the {four_d} volume"
        )

    def order(plane: _Plane) -> tuple:
        return tuple(_plain(plane.volume_fields.get(name)) for name in varying)

    pick = 0 if four_d == "first" else -1
    chosen = [sorted(group, key=order)[pick] for group in positions]
    number = 1 if four_d == "first" else counts[0]
    return chosen, f"volume {number} of {counts[0]} (the {four_d}, by {', '.join(varying)})"


def assemble_series(
    headers: Sequence[tuple[Path, pydicom.Dataset]], *, min_slices: int = 3, four_d: FourD = "reject"
) -> Series:
    """Keep the MR image planes, sort them along their normal and check their geometry."""
    if not headers:
        raise SeriesError("the series has no instances")
    images = [(p, ds) for p, ds in headers if ds.get("SOPClassUID") in MR_IMAGE_CLASSES]
    if not images:
        classes = sorted({str(getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID"))) for _, ds in headers})
        raise SeriesError(f"no MR image in the series (only {', '.join(classes)})")

    planes: list[_Plane] = []
    for path, ds in images:
        if ds.SOPClassUID in MULTI_FRAME_MR_CLASSES:
            planes.extend(_multi_frame_planes(path, ds))
        else:
            planes.append(_classic_plane(path, ds))
    _check_planes(planes)

    orientation = np.asarray(planes[0].orientation)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    distance = {id(p): float(np.dot(normal, p.slice.position)) for p in planes}
    planes.sort(key=lambda p: distance[id(p)])
    positions: list[list[_Plane]] = []
    for plane in planes:
        if positions and distance[id(plane)] - distance[id(positions[-1][0])] < _SAME_POSITION_MM:
            positions[-1].append(plane)
        else:
            positions.append([plane])
    chosen, selection = _one_volume(positions, four_d)

    multi_frame_sources = {p.slice.path for p in chosen if p.slice.frame_number is not None}
    if multi_frame_sources and (len(multi_frame_sources) > 1 or any(p.slice.frame_number is None for p in chosen)):
        raise SeriesError(
            f"the volume's planes come from {len(multi_frame_sources)} multi-frame instance(s)"
            " and possibly single-frame ones; a SEG can reference frames of one multi-frame source only"
        )
    slices = [replace(p.slice, distance=distance[id(p)]) for p in chosen]
    used = {s.path for s in slices}
    ignored = tuple(p for p, _ in headers if p not in used)

    if len(slices) < min_slices:
        raise TooFewSlicesError(f"only {len(slices)} slice(s); at least {min_slices} are needed for a volume")
    steps = np.diff([s.distance for s in slices])
    spacing = float(np.median(steps))
    off = np.abs(steps - spacing) > _SPACING_TOLERANCE * spacing
    if np.any(off):
        index = int(np.argmax(off))
        raise SeriesError(
            f"non-uniform slice spacing: a gap of {steps[index]:.2f} mm after slice {index + 1}"
            f" of {len(slices)} (at {slices[index].distance:.2f} mm along the normal) where"
            f" {spacing:.2f} mm is expected; a slice is probably missing"
        )
    first = slices[0].header
    return Series(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        slices=tuple(slices),
        rows=planes[0].rows,
        columns=planes[0].columns,
        pixel_spacing=planes[0].pixel_spacing,
        row_direction=tuple(float(v) for v in row_dir),  # type: ignore[arg-type]
        column_direction=tuple(float(v) for v in col_dir),  # type: ignore[arg-type]
        slice_spacing=spacing,
        ignored=ignored,
        header=first,
        selection=selection,
    )
