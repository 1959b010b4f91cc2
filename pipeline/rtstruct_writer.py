"""Encoding the label map as a DICOM RT Structure Set, and what every result object shares.

One RTSTRUCT per series: an ROI per structure present (the SEG's name and colour,
RTROIInterpretedType ORGAN, the algorithm identified as in the SEG), its closed planar
contours on every source slice it occupies, in patient coordinates (LPS, mm), each
contour referencing the source plane it lies on; the structure set references the
source series (ReferencedFrameOfReferenceSequence -> RTReferencedStudy -> RTReferencedSeries
-> every source plane in ContourImageSequence) and its frame of reference.

Contours are scikit-image's ``measure.find_contours`` at level 0.5 (marching squares),
not OpenCV or rt-utils: the boundary between pixel centres with sub-pixel vertices, so a
reader that fills the polygon by pixel centre gets the mask back exactly (OpenCV traces
the centres of the border pixels, which loses half a pixel all around; rt-utils is built
on OpenCV and would add a dependency that pins its own pydicom). ``_contours`` computes
them with numpy, every square of the image at once: the same segments (skimage's table,
low values fully connected), joined into the same closed contours, each starting where
find_contours' assembly starts it (at the end of the contour's last segment in scan
order) and listed in the same order (by their first segment); find_contours joins its
segments one by one in Python, which was most of the RTSTRUCT's time. Vertices where the
outline goes straight on are dropped, which keeps the polygon exact (skimage's
``approximate_polygon`` does the same with tolerance 0, but in pure Python, a hundred
times slower).

Holes (a ring such as the skull around the brain on a sagittal slice) are written as
one polygon per connected piece, with each hole joined to its outline by a zero-width
cut ("keyhole"): readers disagree on overlapping contours (plastimatch ORs them by
default, others XOR them), and a keyhole polygon means the same to both.

What the RTSTRUCT, the overlay and the report share with the SEG lives here too: the
UIDs (``output_uid``: the SEG's content identity plus the object type, so the same input
gives the same UIDs per object type and two types never share one), the patient and
study attributes copied from the source, and the series description and number.
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID, generate_uid
from scipy import ndimage
from skimage.measure import points_in_poly

from pipeline.errors import PipelineError
from pipeline.labels import SegmentInfo, segment_info
from pipeline.seg_writer import Algorithm, SegOptions, _content_identity, algorithm_parameters
from pipeline.series import Series
from pipeline.volume import LabelMap

__all__ = [
    "RT_STRUCTURE_SET_STORAGE",
    "OutputEncodingError",
    "Contour",
    "label_counts",
    "present_labels",
    "structure_contours",
    "patient_points",
    "contour_points",
    "encode_rtstruct",
    "check_rtstruct_geometry",
    "output_identity",
    "output_uid",
    "output_description",
    "output_series_number",
    "output_file_meta",
    "patient_and_study",
    "checked_length",
    "structure_infos",
]

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
_DETACHED_STUDY_MANAGEMENT = UID("1.2.840.10008.3.1.2.3.1")  # what RTReferencedStudySequence names a study by
_LO_MAX = 64
_ST_MAX = 1024
_DECIMALS = 3  # ContourData in mm: 0.001 mm, well inside the 0.01 mm geometry check
_DS_FORMAT = f"%.{_DECIMALS}f"
_DS_SEPARATED = _DS_FORMAT + "\\"
POSITION_TOLERANCE_MM = 0.01
# Offsets from the source's SeriesNumber: the SEG takes 1000 (pipeline.seg_writer).
_SERIES_OFFSETS = {"RTSTRUCT": 1001, "OVERLAY": 1002, "REPORT": 1003}
_SERIES_NOUNS = {"RTSTRUCT": "RTSTRUCT", "OVERLAY": "overlay", "REPORT": "volumes"}

_PATIENT_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
)
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber")


class OutputEncodingError(PipelineError):
    """An RTSTRUCT, overlay or report could not be encoded or does not match its source."""


# ---------------------------------------------------------------- shared by every result object

def output_identity(label_map: LabelMap, algorithm: Algorithm, object_type: str, **content: object) -> str:
    """The SEG's content identity (source planes, 4D selection, algorithm) with the object
    type and whatever else decides this object's content, as canonical text.

    The SEG's own encoding options are left out: they do not change this object."""
    base = json.loads(_content_identity(label_map, algorithm, SegOptions()))
    for key in ("segmentation_type", "omit_empty_frames"):
        base.pop(key)
    return json.dumps({**base, "object": object_type, **content}, sort_keys=True, default=str)


def output_uid(identity: str, object_type: str, what: str) -> str:
    """A UID derived from the identity, the object type and what it names ("series",
    "instance", "instance 12"): equal input, equal UID; another type, another UID."""
    return str(generate_uid(entropy_srcs=[f"{object_type}/{what}/", identity]))


def output_description(algorithm: Algorithm, object_type: str) -> str:
    """The SEG's series description with "SEG" replaced by what this object is, e.g.
    "Auto overlay, CT model on inverted T1 MR, black bg" (LO, at most 64 characters)."""
    noun = _SERIES_NOUNS[object_type]
    base = algorithm.series_description
    text = base.replace("SEG", noun, 1) if "SEG" in base else f"{noun}: {base}"
    if len(text) > _LO_MAX:
        raise OutputEncodingError(f"series description {text!r} exceeds {_LO_MAX} characters")
    return text


def output_series_number(series: Series, object_type: str, algorithm: Algorithm) -> int:
    """The source's SeriesNumber plus an offset per object type (the SEG's is 1000) and
    the algorithm's own offset (one per model preset)."""
    number = series.header.get("SeriesNumber")
    return (int(number) if number is not None else 0) + _SERIES_OFFSETS[object_type] + algorithm.series_number_offset


def patient_and_study(source: pydicom.Dataset) -> Dataset:
    """The Patient, Patient Study and General Study attributes of the source, Type 2 ones
    present (empty) where the source lacks them, and its character set."""
    ds = Dataset()
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in _PATIENT_STUDY:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])  # the caller's header stays as it was read
    for keyword in _TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def checked_length(value: str, limit: int, what: str) -> str:
    """``value`` if it fits its VR's ``limit``; refused otherwise, never cut."""
    if len(value) > limit:
        raise OutputEncodingError(f"{what} {value!r} exceeds {limit} characters")
    return value


def structure_infos(label_map: LabelMap, labels: list[int]) -> dict[int, SegmentInfo]:
    """label -> name, codes and colour of each of ``labels``, as the SEG describes it."""
    return {label: segment_info(label_map.names.get(label, f"label_{label}"), label_map.codes) for label in labels}


def output_file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _code_item(code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


# ---------------------------------------------------------------- contours

@dataclass(frozen=True)
class Contour:
    """One closed polygon of a structure on slice ``index`` of the volume, in (row,
    column) pixel coordinates of that slice (pixel centres at integers); holes are
    joined to their outline by a zero-width cut."""

    index: int
    points: np.ndarray  # (n, 2), float, not repeating the first point


# Marching squares as skimage's find_contours does them (fully_connected="low"): per
# square case (ul + 2 ur + 4 ll + 8 lr, a corner counting when above the level), the
# edges (top, bottom, left, right) where its first and its second segment start and end,
# the region above the level on the right of each segment; -1: no segment.
_TOP, _BOTTOM, _LEFT, _RIGHT = 0, 1, 2, 3
_FIRST_SEGMENT = np.full((16, 2), -1, np.intp)
_SECOND_SEGMENT = np.full((16, 2), -1, np.intp)
for _case, _segments in {
    1: ((_TOP, _LEFT),), 2: ((_RIGHT, _TOP),), 3: ((_RIGHT, _LEFT),), 4: ((_LEFT, _BOTTOM),),
    5: ((_TOP, _BOTTOM),), 6: ((_RIGHT, _TOP), (_LEFT, _BOTTOM)), 7: ((_RIGHT, _BOTTOM),),
    8: ((_BOTTOM, _RIGHT),), 9: ((_TOP, _LEFT), (_BOTTOM, _RIGHT)), 10: ((_BOTTOM, _TOP),),
    11: ((_BOTTOM, _LEFT),), 12: ((_LEFT, _RIGHT),), 13: ((_TOP, _RIGHT),), 14: ((_LEFT, _TOP),),
}.items():
    _FIRST_SEGMENT[_case] = _segments[0]
    if len(_segments) > 1:
        _SECOND_SEGMENT[_case] = _segments[1]
del _case, _segments


def _contours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``find_contours(image, 0.5)`` of a boolean image whose border is background, as
    (vertices, starts): every contour's vertices (row, column) one after the other, each
    without its repeated first vertex, and where each contour starts.

    A vertex lies on a pixel edge and is numbered by it: the horizontal edge from (r, c)
    to (r, c + 1) is r * width + c, at (r, c + 0.5); the vertical edge from (r, c) to
    (r + 1, c) is rows * width + r * width + c, at (r + 0.5, c). Each vertex starts one
    segment and ends another, so the segments form closed rings; find_contours, joining
    the segments in scan order, starts a ring at the end of its last segment and lists
    the rings by their first segment."""
    rows, width = image.shape
    pixels = image.astype(np.uint8)
    case = (pixels[:-1, :-1] + 2 * pixels[:-1, 1:] + 4 * pixels[1:, :-1] + 8 * pixels[1:, 1:]).ravel()
    squares = np.flatnonzero((case != 0) & (case != 15))
    cases = case[squares]
    two = _SECOND_SEGMENT[cases, 0] >= 0
    per_square = np.repeat(np.arange(len(squares)), 1 + two)  # segments in scan order
    second = np.zeros(len(per_square), bool)
    second[np.cumsum(1 + two)[two] - 1] = True
    segment_cases = cases[per_square]
    edges = np.where(second[:, None], _SECOND_SEGMENT[segment_cases], _FIRST_SEGMENT[segment_cases])
    row, column = np.divmod(squares[per_square], width - 1)
    plane = rows * width
    edge_offset = np.array([0, width, plane, plane + 1])  # top, bottom, left, right of square (r, c)
    corner = row * width + column
    begin = edge_offset[edges[:, 0]] + corner
    end = edge_offset[edges[:, 1]] + corner
    count = len(begin)
    segment = np.arange(count)
    by_begin = np.argsort(begin)
    at = np.minimum(np.searchsorted(begin, end, sorter=by_begin), max(count - 1, 0))
    following = by_begin[at]
    if count and not np.array_equal(begin[following], end):
        raise OutputEncodingError("a contour runs off the image (its border must be background)")
    # the first and the last segment of each ring: minimum and maximum over ever longer
    # runs of following segments, until a run covers its ring
    first, last, jump = segment, segment, following
    while True:
        longer_first, longer_last = np.minimum(first, first[jump]), np.maximum(last, last[jump])
        if np.array_equal(longer_first, first) and np.array_equal(longer_last, last):
            break
        first, last, jump = longer_first, longer_last, jump[jump]
    # steps from each segment to the last of its ring (list ranking by pointer jumping)
    is_last = last == segment
    to_last = (~is_last).astype(np.intp)
    jump = np.where(is_last, segment, following)
    while True:
        further = jump[jump]
        if np.array_equal(further, jump):
            break
        to_last = to_last + to_last[jump]
        jump = further
    order = np.lexsort((-to_last, first))
    vertex = begin[order]
    horizontal = vertex < plane
    vertex_row, vertex_column = np.divmod(np.where(horizontal, vertex, vertex - plane), width)
    points = np.empty((count, 2))
    points[:, 0] = vertex_row + np.where(horizontal, 0.0, 0.5)
    points[:, 1] = vertex_column + np.where(horizontal, 0.5, 0.0)
    ring_of = first[order]
    starts = np.flatnonzero(np.concatenate([[True], ring_of[1:] != ring_of[:-1]])) if count else np.zeros(0, np.intp)
    return points, starts


def _signed_area(points: np.ndarray) -> float:
    r, c = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(r[:-1], c[1:]) - np.dot(r[1:], c[:-1]) + r[-1] * c[0] - r[0] * c[-1])


def _turns(points: np.ndarray, ring_of: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Which vertices of the closed polygons ``points`` (polygon ``ring_of[i]`` starting
    at ``starts``) are neither repeated nor straight-through."""
    index = np.arange(len(points))
    ring_start = starts[ring_of]
    ring_end = np.append(starts[1:], len(points))[ring_of]
    step = points[np.where(index + 1 == ring_end, ring_start, index + 1)] - points  # from vertex i to the next
    step_in = step[np.where(index == ring_start, ring_end - 1, index - 1)]
    cross = step_in[:, 0] * step[:, 1] - step_in[:, 1] * step[:, 0]
    dot = (step_in * step).sum(axis=1)
    repeated = np.abs(step_in).sum(axis=1) < 1e-9
    straight = (np.abs(cross) < 1e-9) & (dot > 0)
    return ~(repeated | straight)


def _keyhole(outline: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """``outline`` with every hole spliced in through a cut between their closest vertices."""
    polygon = outline
    for hole in sorted(holes, key=lambda h: float(h[:, 0].min())):
        distances = ((polygon[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        rotated = np.concatenate([hole[j:], hole[:j + 1]])  # the hole from its closest vertex, closed
        polygon = np.concatenate([polygon[:i + 1], rotated, polygon[i:]])
    return polygon


def _assemble(outlines: list[np.ndarray], holes: list[np.ndarray]) -> list[np.ndarray]:
    """One polygon per outline, each hole keyholed into the smallest outline around it."""
    if not holes:
        return outlines
    areas = [abs(_signed_area(o)) for o in outlines]
    owned: dict[int, list[np.ndarray]] = {i: [] for i in range(len(outlines))}
    for hole in holes:
        inside = [i for i, outline in enumerate(outlines) if points_in_poly(hole[:1], outline)[0]]
        if not inside:
            raise OutputEncodingError("a hole of a structure lies outside every outline of it")
        owned[min(inside, key=lambda i: areas[i])].append(hole)
    return [_keyhole(outline, owned[i]) for i, outline in enumerate(outlines)]


def _rings(image: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(outlines, holes): the closed boundaries of the foreground of a 2D boolean image
    whose border is background, without repeated or straight-through vertices, in
    find_contours' order."""
    points, starts = _contours(image)
    if not len(points):
        return [], []
    ring_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(points))))
    kept = _turns(points, ring_of, starts)
    points, ring_of = points[kept], ring_of[kept]
    sizes = np.bincount(ring_of, minlength=len(starts))
    # twice the signed area of each ring (exact: the vertices are on a half-pixel grid)
    ends = np.cumsum(sizes)
    index = np.arange(len(points))
    following = np.where(index + 1 == ends[ring_of], ends[ring_of] - sizes[ring_of], index + 1)
    r, c = points[:, 0], points[:, 1]
    areas = np.bincount(ring_of, weights=r * c[following] - r[following] * c, minlength=len(starts))
    outlines, holes = [], []
    for ring, size, area in zip(np.split(points, ends[:-1]), sizes.tolist(), areas.tolist()):
        if size < 3:
            continue
        # find_contours turns around foreground one way and around holes the other
        (outlines if area < 0 else holes).append(ring)
    return outlines, holes


def _slice_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (row, column) of a 2D boolean mask, holes keyholed into their outline."""
    outlines, holes = _rings(np.pad(mask.astype(bool), 1))
    return _assemble([o - 1.0 for o in outlines], [h - 1.0 for h in holes])


def label_counts(label_map: LabelMap) -> np.ndarray:
    """Voxels per label value (index 0: the background), as ``np.bincount`` counts them;
    only the labelled voxels are binned, the background (most of a volume) is counted by
    subtraction: several times faster than binning every voxel."""
    flat = label_map.array.ravel()
    labelled = flat[flat != 0]
    counts = np.bincount(labelled, minlength=1)
    counts[0] = flat.size - labelled.size
    return counts


def present_labels(label_map: LabelMap) -> list[int]:
    """``label_map.present``, counted rather than sorted (several times faster on a large volume)."""
    counts = label_counts(label_map)
    return [int(label) for label in np.flatnonzero(counts[1:]) + 1]


def structure_contours(
    label_map: LabelMap, labels: list[int] | None = None, *, joined: bool = False
) -> dict[int, list[Contour]]:
    """label -> its closed planar contours, slice by slice, for ``labels`` (default:
    every label present). ``joined``: one polygon per slice, its pieces joined by
    zero-width cuts like its holes (fewer, larger contours for the same region).

    Each structure's slices are traced in one call: its bounding box on every slice,
    stacked into one image with a background row between slices (tracing costs a fixed
    overhead per call, which thousands of small slices would pay each)."""
    array = label_map.array
    boxes = ndimage.find_objects(array)
    contours: dict[int, list[Contour]] = {}
    for label in present_labels(label_map) if labels is None else labels:
        zs, ys, xs = boxes[label - 1]
        crop = array[zs, ys, xs] == label
        count, height, width = crop.shape
        stacked = np.zeros((count, height + 1, width + 2), bool)
        stacked[:, :height, 1:-1] = crop
        mosaic = np.concatenate([np.zeros((1, width + 2), bool), stacked.reshape(-1, width + 2)])
        # slice i occupies rows 1 + i*(height+1) .. i*(height+1) + height of the mosaic
        pieces: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        outlines, holes = _rings(mosaic)
        for kind, rings in ((0, outlines), (1, holes)):
            for ring in rings:
                index = int((ring[:, 0].min() - 0.5) // (height + 1))
                local = ring - np.array([1.0 + index * (height + 1) - ys.start, 1.0 - xs.start])
                pieces.setdefault(index, ([], []))[kind].append(local)
        found = []
        for index in sorted(pieces):
            polygons = _assemble(*pieces[index])
            if joined and len(polygons) > 1:
                polygons = [_keyhole(polygons[0], polygons[1:])]
            found += [Contour(zs.start + index, polygon) for polygon in polygons]
        contours[label] = found
    return contours


def patient_points(series: Series, contour: Contour) -> np.ndarray:
    """The contour's vertices in patient coordinates (LPS, mm), (n, 3)."""
    return _patient_points(series, [contour])[0]


def _patient_points(series: Series, contours: list[Contour]) -> list[np.ndarray]:
    """``patient_points`` of each contour, computed for all of them at once."""
    if not contours:
        return []
    row_spacing, column_spacing = series.pixel_spacing
    along_row = np.asarray(series.row_direction, float) * column_spacing  # one column further
    along_column = np.asarray(series.column_direction, float) * row_spacing  # one row further
    points = np.concatenate([contour.points for contour in contours])
    sizes = [len(contour.points) for contour in contours]
    origins = np.repeat(np.asarray([series.slices[contour.index].position for contour in contours], float),
                        sizes, axis=0)
    rows, columns = points[:, 0:1], points[:, 1:2]
    return np.split(origins + columns * along_row + rows * along_column, np.cumsum(sizes)[:-1])


# ---------------------------------------------------------------- the RT Structure Set

def _raw(tag: int, vr: str, text: str | bytes) -> RawDataElement:
    """A text element as its encoded value: pydicom validates and converts every value it
    is given, seconds for the thousands of contours and hundred thousands of vertices of
    a real segmentation. (pydicom 3 still decodes such an element once when it writes a
    dataset built in memory, which has no original encoding.) Text values encode the same
    in every transfer syntax, so the element stays valid whatever the dataset is sent as."""
    value = text.encode("ascii") if isinstance(text, str) else text
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _contour_data(points: np.ndarray) -> RawDataElement:
    """ContourData (DS, mm, 0.001 mm)."""
    rounded = np.round(points.ravel(), _DECIMALS) + 0.0  # + 0.0: no "-0.000"
    # one format operation for all values: the same text as formatting them one by one
    return _raw(0x30060050, "DS", _DS_SEPARATED * (len(rounded) - 1) % tuple(rounded.tolist()[:-1])
                + _DS_FORMAT % rounded[-1])


def _image_items(series: Series) -> list[tuple[RawDataElement, ...]]:
    """Per source plane, the elements of an image reference (class, instance, frame)."""
    sop_class = _raw(0x00081150, "UI", str(series.header.SOPClassUID))
    items = []
    for plane in series.slices:
        elements = [sop_class, _raw(0x00081155, "UI", plane.sop_instance_uid)]
        if plane.frame_number is not None:
            elements.append(_raw(0x00081160, "IS", str(plane.frame_number)))
        items.append(tuple(elements))
    return items


def _image_item(elements: tuple[RawDataElement, ...]) -> Dataset:
    return Dataset({element.tag: element for element in elements})


_CLOSED_PLANAR = _raw(0x30060042, "CS", "CLOSED_PLANAR")
_CONTOUR_IMAGE_SEQUENCE = Tag(0x30060016)


def _contour_item(number: int, image: tuple[RawDataElement, ...], points: np.ndarray) -> Dataset:
    elements = (
        DataElement(_CONTOUR_IMAGE_SEQUENCE, "SQ", DicomSequence([_image_item(image)])),
        _CLOSED_PLANAR,
        _raw(0x30060046, "IS", str(len(points))),  # NumberOfContourPoints
        _raw(0x30060048, "IS", str(number)),  # ContourNumber
        _contour_data(points),
    )
    return Dataset({element.tag: element for element in elements})


def encode_rtstruct(label_map: LabelMap, algorithm: Algorithm) -> Dataset | None:
    """An RT Structure Set of the labels present, or None when no label is present."""
    present = present_labels(label_map)
    if not present:
        return None
    series = label_map.volume.series
    header = series.header
    frame_of_reference = header.get("FrameOfReferenceUID")
    if not frame_of_reference:
        raise OutputEncodingError("the source series has no FrameOfReferenceUID for the RTSTRUCT to reference")
    identity = output_identity(label_map, algorithm, "RTSTRUCT")
    sop_instance_uid = output_uid(identity, "RTSTRUCT", "instance")
    infos = structure_infos(label_map, present)
    contours = structure_contours(label_map, present)
    date, time = _now()

    ds = patient_and_study(header)
    ds.file_meta = output_file_meta(RT_STRUCTURE_SET_STORAGE, sop_instance_uid)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = output_uid(identity, "RTSTRUCT", "series")
    ds.SeriesNumber = output_series_number(series, "RTSTRUCT", algorithm)
    ds.SeriesDescription = output_description(algorithm, "RTSTRUCT")
    ds.OperatorsName = None
    ds.Manufacturer = "dicom-node"
    ds.ManufacturerModelName = checked_length(algorithm.name, _LO_MAX, "the algorithm name")
    ds.SoftwareVersions = checked_length(algorithm.software_version, _LO_MAX, "the software version")
    ds.DeviceSerialNumber = "0"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "AUTOSEG"
    ds.StructureSetName = "Automatic segmentation"
    described = (f"Automatic research segmentation, not for diagnosis. {algorithm.name} {algorithm.task};"
                 f" {algorithm.sequence_class}, {algorithm.preprocessing}.")
    with_reason = f"{described} Classification: {algorithm.classification}"
    # ST holds 1024 characters: a longer classification reason is left out, not cut (the job keeps it)
    ds.StructureSetDescription = with_reason if len(with_reason) <= _ST_MAX else checked_length(
        described, _ST_MAX, "the structure set description")
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_instance_uid
    images = _image_items(series)
    referenced_series.ContourImageSequence = [_image_item(elements) for elements in images]
    study = Dataset()
    study.ReferencedSOPClassUID = _DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = series.study_instance_uid
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_of_reference
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator")

    parameters = algorithm_parameters(algorithm)
    rois, roi_contours, observations = [], [], []
    for number, label in enumerate(present, start=1):
        info = infos[label]
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = info.name[:_LO_MAX]  # the SEG's segment label, as pipeline.seg_writer writes it
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIDerivationAlgorithmIdentificationSequence = hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version,
            parameters=parameters,
        )
        rois.append(roi)

        items = [_contour_item(n, images[contour.index], points) for n, (contour, points)
                 in enumerate(zip(contours[label], _patient_points(series, contours[label])), start=1)]
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(info.rgb)
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = DicomSequence(items)
        roi_contours.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = None
        observation.RTROIIdentificationCodeSequence = [_code_item(info.property_type)]
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = roi_contours
    ds.RTROIObservationsSequence = observations
    check_rtstruct_geometry(ds, label_map)
    return ds


def _text(ds: Dataset, tag: int) -> str | None:
    """An element's value as text, without converting an element still encoded."""
    element = ds.get_item(tag)
    if element is None:
        return None
    if element.is_raw:
        return element.value.decode("ascii").rstrip(" \0") if element.value is not None else ""
    return str(element.value)


def contour_points(item: Dataset) -> np.ndarray:
    """The (n, 3) vertices of a ContourSequence item, read fast when still encoded."""
    element = item.get_item(0x30060050)
    if element is not None and element.is_raw and isinstance(element.value, bytes):
        values = np.array(element.value.strip().split(b"\\"), dtype=float)
    else:
        values = np.asarray(item.ContourData, dtype=float)
    return values.reshape(-1, 3)


def _image_key(image: Dataset) -> tuple[str, int | None]:
    frame = _text(image, 0x00081160)
    return _text(image, 0x00081155) or "", int(frame) if frame else None


def check_rtstruct_geometry(ds: Dataset, label_map: LabelMap) -> None:
    """Every contour must lie in the plane of the one source plane it references (0.01 mm)
    and reference only planes of the volume; the structure set must reference them all."""
    series = label_map.volume.series
    planes = {(s.sop_instance_uid, s.frame_number): k for k, s in enumerate(series.slices)}
    normal = series.normal
    [frame] = ds.ReferencedFrameOfReferenceSequence
    if frame.FrameOfReferenceUID != series.header.get("FrameOfReferenceUID"):
        raise OutputEncodingError("the RTSTRUCT's frame of reference differs from the source series'")
    listed = {_image_key(i) for i in frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    if listed != set(planes):
        raise OutputEncodingError("the RTSTRUCT does not list exactly the source planes of the volume")
    for roi in ds.ROIContourSequence:
        for number, item in enumerate(roi.ContourSequence, start=1):
            [image] = item.ContourImageSequence
            key = _image_key(image)
            if key not in planes:
                raise OutputEncodingError(f"ROI {roi.ReferencedROINumber} contour {number} references an image"
                                          f" outside the volume: {key}")
            points = contour_points(item)
            announced = int(_text(item, 0x30060046) or -1)
            if len(points) != announced:
                raise OutputEncodingError(f"ROI {roi.ReferencedROINumber} contour {number}: NumberOfContourPoints"
                                          f" {announced}, {len(points)} points given")
            origin = np.asarray(series.slices[planes[key]].position, float)
            off_plane = np.abs((points - origin) @ normal).max()
            if off_plane > POSITION_TOLERANCE_MM:
                raise OutputEncodingError(f"ROI {roi.ReferencedROINumber} contour {number} lies {off_plane:.3f} mm"
                                          " off the plane of the source image it references")
