"""Is a received series whole? Decided from a few header fields of each instance.

Series completion (``dicom_node.receive.completion``) may close a series as soon as the
association that carried it is released, but only when the series is known to be
whole; otherwise the quiet time (``completion.stable_seconds``) decides. A sender may
release after every instance, or spread a series over several associations, so "the
association ended" alone says nothing.

The rule:

* Multi-frame MR objects (Enhanced, Legacy Converted) carry their own frames: a series
  whose images are all multi-frame objects is whole.
* Classic images are whole when they form one stack: a single orientation, positions
  along the normal uniformly spaced with no gap, the same number of images at every
  position, and a count the headers announce, where they announce it:
  ImagesInAcquisition (0020,1002) equal to the number of images; a scanner's own
  slice count, Philips' Number of Slices MR (2001,1018) or GE's Locations in
  Acquisition (0021,104F), equal to the number of positions; and
  NumberOfTemporalPositions (0020,0105) times the positions equal to the number of
  images. A stack whose headers announce no slice count is never known to be whole: a
  sender that stops early leaves a perfectly regular stack, so the timer decides.

``placement_of`` extracts what the rule needs when an instance is received (cheap, no
pixel data); ``is_whole`` applies the rule to the placements of a series.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Iterable

import numpy as np
import pydicom

from pipeline.input.series import MR_IMAGE_STORAGE, MULTI_FRAME_MR_CLASSES

__all__ = ["PlacementKind", "Placement", "Wholeness", "placement_of", "placement_tags", "is_whole", "known_missing"]

_ORIENTATION_TOLERANCE = 1e-3
_SAME_POSITION_MM = 0.01
_SPACING_TOLERANCE = 0.01  # fraction of the slice spacing

# (group, private creator, element offset) of a scanner's own count of slice positions
_VENDOR_SLICE_COUNTS = (
    (0x2001, "Philips Imaging DD 001", 0x18),  # Number of Slices MR
    (0x0021, "GEMS_RELA_01", 0x4F),  # Locations in Acquisition
)


class PlacementKind(StrEnum):
    CLASSIC = "classic"  # a single-frame MR image
    MULTIFRAME = "multiframe"  # an Enhanced or Legacy Converted MR image
    OTHER = "other"  # not an MR image (a report, a presentation state)
    UNKNOWN = "unknown"  # undecodable


@dataclass(frozen=True)
class Placement:
    """What series completion needs to know of one received instance."""

    kind: PlacementKind
    orientation: tuple[float, ...] | None = None
    position: tuple[float, float, float] | None = None
    images_in_acquisition: int | None = None
    slices_announced: int | None = None  # the scanner's private count of slice positions
    temporal_positions: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PlacementKind(self.kind))  # the string form from JSON or a caller

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> "Placement":
        if not text:
            return cls(PlacementKind.OTHER)
        data = json.loads(text)
        for key in ("orientation", "position"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class Wholeness:
    whole: bool
    reason: str


def _int(value: object) -> int | None:
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _vendor_slice_count(ds: pydicom.Dataset) -> int | None:
    for group, creator, offset in _VENDOR_SLICE_COUNTS:
        try:
            element = ds.private_block(group, creator)[offset]
        except (KeyError, ValueError):
            continue
        value = element.value
        if isinstance(value, bytes) and len(value) in (2, 4):  # an implicit-VR private tag read as UN
            value = int.from_bytes(value, "little", signed=True)
        count = _int(value[0] if isinstance(value, (list, tuple)) else value)
        if count is not None:
            return count
    return None


def placement_tags() -> list[pydicom.tag.BaseTag]:
    """Every element ``placement_of`` reads (each vendor's private slice count in any of
    its group's blocks), so that a caller may decode only these."""
    tags = [pydicom.tag.Tag(keyword) for keyword in ("SpecificCharacterSet", "SOPClassUID", "ImageOrientationPatient",
                                                     "ImagePositionPatient", "ImagesInAcquisition",
                                                     "NumberOfTemporalPositions")]
    for group, _, offset in _VENDOR_SLICE_COUNTS:
        tags += [pydicom.tag.Tag(group, block) for block in range(0x10, 0x100)]  # the private creators
        tags += [pydicom.tag.Tag(group, (block << 8) | offset) for block in range(0x10, 0x100)]
    return tags


def placement_of(ds: pydicom.Dataset) -> Placement:
    """The placement of one instance, from its header; tolerant of anything missing or
    undecodable (such an instance is "unknown", and its series is never known whole)."""
    try:
        return _placement(ds)
    except Exception:  # any decoding error of a received header: let the timer decide
        return Placement(PlacementKind.UNKNOWN)


def _placement(ds: pydicom.Dataset) -> Placement:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in MULTI_FRAME_MR_CLASSES:
        return Placement(PlacementKind.MULTIFRAME)
    if sop_class != MR_IMAGE_STORAGE:
        return Placement(PlacementKind.OTHER)
    return Placement(
        PlacementKind.CLASSIC,
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        images_in_acquisition=_int(ds.get("ImagesInAcquisition")),
        slices_announced=_vendor_slice_count(ds),
        temporal_positions=_int(ds.get("NumberOfTemporalPositions")),
    )


def _announced(values: Iterable[int | None]) -> int | None | str:
    """The one value all instances announce, None if none does, "mixed" if they disagree."""
    found = {v for v in values if v is not None}
    if not found:
        return None
    return found.pop() if len(found) == 1 else "mixed"


def is_whole(placements: Iterable[Placement]) -> Wholeness:
    """Whether the instances received so far are known to be the whole series."""
    placements = list(placements)
    if any(p.kind is PlacementKind.UNKNOWN for p in placements):
        return Wholeness(False, "an instance whose header could not be read")
    images = [p for p in placements if p.kind is not PlacementKind.OTHER]
    if not images:
        return Wholeness(False, "no image instance")
    kinds = {p.kind for p in images}
    if kinds == {PlacementKind.MULTIFRAME}:
        return Wholeness(True, f"{len(images)} multi-frame object(s), each with its own frames")
    if kinds != {PlacementKind.CLASSIC}:
        return Wholeness(False, "classic and multi-frame images mixed")
    if any(p.orientation is None or p.position is None for p in images):
        return Wholeness(False, "an image without orientation or position")
    orientations = np.array([p.orientation for p in images])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        return Wholeness(False, "several orientations")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    distances = np.sort(np.array([p.position for p in images]) @ normal)
    # distinct positions and how many images lie at each
    starts = np.concatenate([[True], np.diff(distances) > _SAME_POSITION_MM])
    positions = distances[starts]
    per_position = np.diff(np.append(np.flatnonzero(starts), len(distances)))
    if len(set(per_position.tolist())) != 1:
        return Wholeness(False, "not the same number of images at every position")
    if len(positions) > 1:
        gaps = np.diff(positions)
        if gaps.max() - gaps.min() > _SPACING_TOLERANCE * gaps.min():
            return Wholeness(False, "positions not uniformly spaced (a gap, or slices still to come)")
    checks = []
    for what, announced, have in (
        ("ImagesInAcquisition", _announced(p.images_in_acquisition for p in images), len(images)),
        ("the scanner's slice count", _announced(p.slices_announced for p in images), len(positions)),
    ):
        if announced == "mixed":
            return Wholeness(False, f"instances disagree on {what}")
        if announced is not None:
            checks.append((what, announced, have))
    if not checks:
        return Wholeness(False, "the headers announce no slice count")
    temporal = _announced(p.temporal_positions for p in images)
    if isinstance(temporal, int):
        checks.append(("NumberOfTemporalPositions x positions", temporal * len(positions), len(images)))
    for what, announced, have in checks:
        if announced != have:
            return Wholeness(False, f"{have} received, {what} announces {announced}")
    return Wholeness(True, f"{len(images)} images at {len(positions)} positions, as the headers announce")


def known_missing(placements: Iterable[Placement]) -> str | None:
    """Why the instances received are known to lack some of the series, or None when
    nothing says so (which is not the same as known whole).

    Known missing: a single stack of classic images whose positions leave a gap (a step
    of at least 1.5 times the smallest), or fewer images than the headers announce
    (ImagesInAcquisition, the scanner's private slice count). A series whose headers say
    nothing either way is left to the completion timer, as before."""
    images = [p for p in placements if p.kind is PlacementKind.CLASSIC]
    if not images or any(p.orientation is None or p.position is None for p in images):
        return None
    orientations = np.array([p.orientation for p in images])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        return None  # several stacks (a localizer): not a question of missing slices
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    distances = np.sort(np.array([p.position for p in images]) @ normal)
    starts = np.concatenate([[True], np.diff(distances) > _SAME_POSITION_MM])
    positions = distances[starts]
    if len(positions) > 2:
        steps = np.diff(positions)
        spacing = float(steps.min())
        if steps.max() >= 1.5 * spacing:
            at = int(np.argmax(steps))
            missing = int(round(steps[at] / spacing)) - 1
            return (f"a gap of {steps[at]:.2f} mm after position {at + 1} of {len(positions)} where the spacing is"
                    f" {spacing:.2f} mm: about {missing} slice(s) missing")
    for what, announced, have in (
        ("ImagesInAcquisition", _announced(p.images_in_acquisition for p in images), len(images)),
        ("the scanner's slice count", _announced(p.slices_announced for p in images), len(positions)),
    ):
        if isinstance(announced, int) and have < announced:
            return f"{have} received where {what} announces {announced}"
    return None
