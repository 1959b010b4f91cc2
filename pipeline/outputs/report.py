"""Encoding the structures' volumes as a TID 1500 Measurement Report (Comprehensive 3D SR).

One report per series: a ``MeasurementReport`` (TID 1500) whose observer is the
algorithm (a device), with one Volumetric ROI Measurements group (TID 1411) per
structure present, in label order: its tracking identifier (the structure's name and a
UID), finding category and type (the SEG's SNOMED CT codes), finding site with
laterality where the code table gives one, the algorithm (name and version), and one
measurement, Volume (SCT 118565006) in ml (UCUM ``ml``): the structure's voxel count times
the voxel volume (row spacing x column spacing x slice spacing).

The region each volume belongs to: the SEG's segment (``ReferencedSegment``, with the
source series it was made from) when the SEG is given; otherwise the source images
themselves, as the structure's outline on each image it lies on (``ImageRegion``, one
closed polyline in pixel coordinates per image: the RTSTRUCT's contours, the pieces of
one slice joined by zero-width cuts). The second form is larger; a job that makes a SEG
anyway should pass it.

highdicom builds the document (its header, the evidence, the equipment); the content
tree is built here with pydicom, item for item what highdicom's templates
(``MeasurementReport``, ``ObservationContext``,
``VolumetricROIMeasurementsAndQualitativeEvaluations``, ``ReferencedSegment``,
``ImageRegion``) write. highdicom validates, deep-copies and parses back every content
item of a document it is given, milliseconds per item, more than a second for a hundred
structures; it is handed the root with its first item only, and the whole tree is put
in place after. The report stays a TID 1500 that highdicom's reader and dcmqi's
tid1500reader read back (tests/test_report.py).
"""

from __future__ import annotations

from functools import lru_cache

import highdicom as hd
import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DS

from pipeline.input.series import Series
from pipeline.labels import Code
from pipeline.model.types import LabelMap
from pipeline.outputs.common import (
    Algorithm,
    OutputEncodingError,
    label_counts,
    output_description,
    output_identity,
    output_series_number,
    output_uid,
    patient_and_study,
    structure_infos,
)
from pipeline.outputs.contours import structure_contours

__all__ = ["COMPREHENSIVE_3D_SR_STORAGE", "MILLILITRE", "encode_report", "structure_volumes", "voxel_volume_ml"]

COMPREHENSIVE_3D_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.34")
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_SEGMENTATION_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")

# The concept names highdicom's templates use, as they spell them.
_LANGUAGE = Code("121049", "DCM", "Language of Content Item and Descendants")
_OBSERVER_TYPE = Code("121005", "DCM", "Observer Type")
_DEVICE_UID = Code("121012", "DCM", "Device Observer UID")
_DEVICE_NAME = Code("121013", "DCM", "Device Observer Name")
_DEVICE_MANUFACTURER = Code("121014", "DCM", "Device Observer Manufacturer")
_DEVICE_MODEL = Code("121015", "DCM", "Device Observer Model Name")
_IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
_MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")
_TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")
_TRACKING_UID = Code("112040", "DCM", "Tracking Unique Identifier")
_FINDING_CATEGORY = Code("276214006", "SCT", "Finding category")
_FINDING = Code("121071", "DCM", "Finding")
_FINDING_SITE = Code("363698007", "SCT", "Finding Site")
_LATERALITY = Code("272741003", "SCT", "Laterality")
_ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
_REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
_SOURCE_SERIES = Code("121232", "DCM", "Source Series for Segmentation")
_IMAGE_REGION = Code("111030", "DCM", "Image Region")
_SOURCE = Code("260753009", "SCT", "Source")
_VOLUME = codes.SCT.Volume
_REPORT_TITLE = codes.cid7021.ImagingMeasurementReport
_DEVICE = codes.DCM.Device
_PROCEDURE_REPORTED = codes.DCM.ProcedureReported
_MRI = codes.cid100.MRIUnspecifiedBodyRegion

_CONTAINS, _HAS_OBS_CONTEXT, _HAS_CONCEPT_MOD, _SELECTED_FROM = (
    "CONTAINS", "HAS OBS CONTEXT", "HAS CONCEPT MOD", "SELECTED FROM")
_GRAPHIC_DATA = Tag("GraphicData")
_CONTENT_SEQUENCE = Tag("ContentSequence")


def voxel_volume_ml(series: Series) -> float:
    """The volume of one voxel of the grid, in ml."""
    row_spacing, column_spacing = series.pixel_spacing
    return row_spacing * column_spacing * series.slice_spacing / 1000.0


def structure_volumes(label_map: LabelMap) -> dict[int, float]:
    """label -> volume in ml (voxel count x voxel volume) of every label present."""
    counts = label_counts(label_map)
    unit = voxel_volume_ml(label_map.volume.series)
    return {int(label): float(counts[label]) * unit for label in np.flatnonzero(counts[1:]) + 1}


def _segment_numbers(seg: pydicom.Dataset, label_map: LabelMap, present: list[int]) -> dict[int, int]:
    """label -> its segment number in ``seg``: the SEG numbers the labels present 1..N in
    order (a LABELMAP SEG adds background 0); the names must agree."""
    if seg.SOPClassUID not in _SEGMENTATION_CLASSES:
        raise OutputEncodingError(f"the report's SEG is not a segmentation (SOP class {seg.SOPClassUID})")
    segments = [s for s in seg.SegmentSequence if int(s.SegmentNumber) > 0]
    infos = structure_infos(label_map, present)
    if [str(s.SegmentLabel) for s in segments] != [infos[label].name[:64] for label in present]:
        raise OutputEncodingError("the SEG's segments are not the structures of this label map")
    if str(seg.SeriesInstanceUID) == label_map.volume.series.series_instance_uid or not any(
        str(r.SeriesInstanceUID) == label_map.volume.series.series_instance_uid for r in seg.ReferencedSeriesSequence
    ):
        raise OutputEncodingError("the SEG does not derive from the label map's source series")
    return {label: int(s.SegmentNumber) for label, s in zip(present, segments)}


# ---------------------------------------------------------------- content items, as highdicom writes them

@lru_cache(maxsize=None)
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    return tag_for_keyword(keyword), dictionary_VR(keyword)


def _element(keyword: str, value: object) -> DataElement:
    """A data element as ``Dataset.__setattr__`` makes it (the same value checks), without
    the keyword lookups and the dataset's bookkeeping of each attribute set."""
    tag, vr = _tag_and_vr(keyword)
    return DataElement(tag, vr, value)


def _dataset(*elements: DataElement | RawDataElement) -> Dataset:
    return Dataset({element.tag: element for element in elements})


def _code(code) -> Dataset:
    """A code item as highdicom's ``CodedConcept`` writes it (a long value as
    LongCodeValue or URNCodeValue; the meaning at most 64 characters)."""
    value, meaning = str(code.value), str(code.meaning)
    if len(meaning) > 64:
        raise OutputEncodingError(f"code meaning {meaning!r} exceeds 64 characters")
    if len(value) > 16:
        keyword = "URNCodeValue" if value.startswith("urn") or "://" in value else "LongCodeValue"
    else:
        keyword = "CodeValue"
    elements = [_element(keyword, value), _element("CodeMeaning", meaning),
                _element("CodingSchemeDesignator", str(code.scheme_designator))]
    version = getattr(code, "scheme_version", None)
    if version is not None:
        elements.append(_element("CodingSchemeVersion", str(version)))
    return _dataset(*elements)


def _content_item(value_type: str, name, relationship: str | None, *elements: DataElement | RawDataElement,
                  children: list[Dataset] | None = None) -> Dataset:
    base = [_element("ValueType", value_type), _element("ConceptNameCodeSequence", [_code(name)])]
    if relationship is not None:
        base.append(_element("RelationshipType", relationship))
    if children:
        base.append(_element("ContentSequence", children))
    return _dataset(*base, *elements)


def _code_item(name, value, relationship: str, children: list[Dataset] | None = None) -> Dataset:
    return _content_item("CODE", name, relationship, _element("ConceptCodeSequence", [_code(value)]),
                         children=children)


def _text_item(name, value: str, relationship: str) -> Dataset:
    return _content_item("TEXT", name, relationship, _element("TextValue", str(value)))


def _uid_item(name, value: str, relationship: str) -> Dataset:
    return _content_item("UIDREF", name, relationship, _element("UID", value))


def _container(name, relationship: str | None, children: list[Dataset], template: str | None = None) -> Dataset:
    elements = [_element("ContinuityOfContent", "CONTINUOUS")]
    if template is not None:
        elements.append(_element("ContentTemplateSequence", [_dataset(
            _element("MappingResource", "DCMR"), _element("TemplateIdentifier", template))]))
    return _content_item("CONTAINER", name, relationship, *elements, children=children)


def _image_item(name, relationship: str, sop_class_uid: str, sop_instance_uid: str, *,
                frame_number: int | None = None, segment_number: int | None = None) -> Dataset:
    reference = [_element("ReferencedSOPClassUID", str(sop_class_uid)),
                 _element("ReferencedSOPInstanceUID", str(sop_instance_uid))]
    if frame_number is not None:
        reference.append(_element("ReferencedFrameNumber", [frame_number]))
    if segment_number is not None:
        reference.append(_element("ReferencedSegmentNumber", segment_number))
    return _content_item("IMAGE", name, relationship, _element("ReferencedSOPSequence", [_dataset(*reference)]))


def _volume_item(value: float) -> Dataset:
    """TID 300 Measurement: the NUM item of highdicom's ``Measurement`` (the value as
    DS, formatted to fit, and exactly as FD)."""
    measured = _dataset(_element("NumericValue", DS(value, auto_format=True)),
                        _element("FloatingPointValue", value),
                        _element("MeasurementUnitsCodeSequence", [_code(MILLILITRE)]))
    return _content_item("NUM", _VOLUME, _CONTAINS, _element("MeasuredValueSequence", [measured]))


def _region_items(series: Series, contours) -> list[Dataset]:
    """highdicom's ``ImageRegion`` per contour: a closed POLYLINE in SCOORD pixel
    coordinates, (column, row) with (0, 0) the top left corner of the first pixel, so a
    pixel centre is at +0.5, on the source image it is drawn on."""
    sop_class_uid = str(series.header.SOPClassUID)
    items = []
    for contour in contours:
        plane = series.slices[contour.index]
        points = contour.points[:, ::-1] + 0.5
        closed = np.vstack([points, points[:1]])
        data = closed.astype("<f4").tobytes()  # FL, as pydicom packs highdicom's list of floats
        source = _image_item(_SOURCE, _SELECTED_FROM, sop_class_uid, plane.sop_instance_uid,
                             frame_number=plane.frame_number)
        items.append(_content_item(
            "SCOORD", _IMAGE_REGION, _CONTAINS, _element("GraphicType", "POLYLINE"),
            RawDataElement(_GRAPHIC_DATA, "FL", len(data), data, 0, False, True), children=[source]))
    return items


def _finding_sites(info) -> list[Dataset]:
    if info.region is not None:
        laterality = info.region_modifier
        site = info.region
    elif info.type_modifier is not None:
        laterality = info.type_modifier
        site = info.property_type
    else:
        return []
    children = [_code_item(_LATERALITY, laterality, _HAS_CONCEPT_MOD)] if laterality is not None else None
    return [_code_item(_FINDING_SITE, site, _HAS_CONCEPT_MOD, children=children)]


def _measurement_group(info, tracking_uid: str, volume: float, algorithm: Algorithm,
                       where: list[Dataset]) -> Dataset:
    """TID 1411 Volumetric ROI Measurements, in highdicom's order: tracking identifier,
    finding category and type, finding sites, algorithm, the measurement, the region."""
    return _container(_MEASUREMENT_GROUP, _CONTAINS, [
        _text_item(_TRACKING_IDENTIFIER, info.name[:64], _HAS_OBS_CONTEXT),  # the SEG's segment label
        _uid_item(_TRACKING_UID, tracking_uid, _HAS_OBS_CONTEXT),
        _code_item(_FINDING_CATEGORY, info.category, _CONTAINS),
        _code_item(_FINDING, info.property_type, _CONTAINS),
        *_finding_sites(info),
        # name and version only: the parameters are in the SEG and its description
        _text_item(_ALGORITHM_NAME, algorithm.name, _HAS_CONCEPT_MOD),
        _text_item(_ALGORITHM_VERSION, algorithm.version, _HAS_CONCEPT_MOD),
        _volume_item(volume),
        *where,
    ], template="1411")


def _measurement_report(algorithm: Algorithm, groups: list[Dataset]) -> Dataset:
    """The root of TID 1500: language, the device observer (TID 1001/1004), the
    procedure reported and the measurement groups."""
    device_uid = str(generate_uid(entropy_srcs=["device", algorithm.name, algorithm.version]))
    return _container(_REPORT_TITLE, None, [
        _code_item(_LANGUAGE, hd.sr.templates.DEFAULT_LANGUAGE, _HAS_CONCEPT_MOD),
        _code_item(_OBSERVER_TYPE, _DEVICE, _HAS_OBS_CONTEXT),
        _uid_item(_DEVICE_UID, device_uid, _HAS_OBS_CONTEXT),
        _text_item(_DEVICE_NAME, algorithm.name, _HAS_OBS_CONTEXT),
        _text_item(_DEVICE_MANUFACTURER, "dicom-node", _HAS_OBS_CONTEXT),
        _text_item(_DEVICE_MODEL, algorithm.task, _HAS_OBS_CONTEXT),
        _code_item(_PROCEDURE_REPORTED, _MRI, _HAS_CONCEPT_MOD),
        _container(_IMAGING_MEASUREMENTS, _CONTAINS, groups),
    ], template="1500")


# ---------------------------------------------------------------- the document

def _evidence(series: Series) -> list[Dataset]:
    """The source instances, for highdicom's evidence list, each once: the first with
    its patient and study attributes (the report takes them from it, Type 2 ones
    present), every one with the UIDs the evidence sequence lists."""
    items: dict[str, Dataset] = {}
    for plane in series.slices:
        if plane.sop_instance_uid not in items:
            header = plane.header
            if items:
                item = Dataset()
                if "StudyInstanceUID" in header:
                    item.StudyInstanceUID = header.StudyInstanceUID
            else:
                item = patient_and_study(header)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
                item[keyword] = header[keyword]
            items[plane.sop_instance_uid] = item
    return list(items.values())


def _first_item_only(content: Dataset) -> Dataset:
    """The root item with its first child only, for highdicom to build the document around."""
    root = Dataset()
    for element in content:
        if element.tag != _CONTENT_SEQUENCE:
            root.add(element)
    root.ContentSequence = [content.ContentSequence[0]]
    return root


def encode_report(
    label_map: LabelMap, algorithm: Algorithm, seg: pydicom.Dataset | None = None
) -> pydicom.Dataset | None:
    """A TID 1500 Measurement Report with every structure's volume, or None when no label
    is present; the structures reference ``seg``'s segments when it is given (the SEG
    ``encode_seg`` made of the same label map), else the source images."""
    volumes = structure_volumes(label_map)
    present = list(volumes)
    if not present:
        return None
    series = label_map.volume.series
    numbers = _segment_numbers(seg, label_map, present) if seg is not None else None
    identity = output_identity(label_map, algorithm, "REPORT",
                               seg=str(seg.SOPInstanceUID) if seg is not None else None)
    infos = structure_infos(label_map, present)
    contours = structure_contours(label_map, present, joined=True) if seg is None else None

    groups = []
    for label in present:
        if seg is not None:
            where = [_image_item(_REFERENCED_SEGMENT, _CONTAINS, seg.SOPClassUID, seg.SOPInstanceUID,
                                 segment_number=numbers[label]),
                     _uid_item(_SOURCE_SERIES, series.series_instance_uid, _CONTAINS)]
        else:
            where = _region_items(series, contours[label])
        groups.append(_measurement_group(infos[label], output_uid(identity, "REPORT", f"tracking {label}"),
                                         volumes[label], algorithm, where))
    content = _measurement_report(algorithm, groups)

    # the source instances first: the report takes its patient and study from the first
    evidence = _evidence(series) + ([seg] if seg is not None else [])
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=_first_item_only(content),
            series_instance_uid=output_uid(identity, "REPORT", "series"),
            series_number=output_series_number(series, "REPORT", algorithm),
            sop_instance_uid=output_uid(identity, "REPORT", "instance"),
            instance_number=1,
            manufacturer="dicom-node",
            is_complete=True,
            series_description=output_description(algorithm, "REPORT"),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputEncodingError(f"highdicom could not encode the report: {exc}") from exc
    # a plain dataset: highdicom's object would keep the one-item tree it parsed as its content
    report = Dataset({tag: element for tag, element in sr.items() if tag != _CONTENT_SEQUENCE})
    report.ContentSequence = content.ContentSequence
    report.file_meta = sr.file_meta
    report.preamble = sr.preamble
    if "SpecificCharacterSet" in evidence[0]:
        report.SpecificCharacterSet = evidence[0].SpecificCharacterSet
    return report
