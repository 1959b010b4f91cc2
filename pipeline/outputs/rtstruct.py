"""Encoding the label map as a DICOM RT Structure Set.

One RTSTRUCT per series: an ROI per structure present (the SEG's name and colour,
RTROIInterpretedType ORGAN, the algorithm identified as in the SEG), its closed planar
contours on every source slice it occupies, in patient coordinates (LPS, mm), each
contour referencing the source plane it lies on; the structure set references the
source series (ReferencedFrameOfReferenceSequence -> RTReferencedStudy -> RTReferencedSeries
-> every source plane in ContourImageSequence) and its frame of reference.

The contours come from ``pipeline.outputs.contours``; the UIDs, patient and study
attributes, series number and description from ``pipeline.outputs.common``, as for
every result object.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import UID

from pipeline.input.series import Series
from pipeline.model.types import LabelMap
from pipeline.outputs.common import (
    LO_MAX,
    POSITION_TOLERANCE_MM,
    Algorithm,
    OutputEncodingError,
    algorithm_parameters,
    checked_length,
    code_item,
    now,
    output_description,
    output_file_meta,
    output_identity,
    output_series_number,
    output_uid,
    patient_and_study,
    present_labels,
    structure_infos,
)
from pipeline.outputs.contours import (
    patient_points_of,
    structure_contours,
)

__all__ = ["RT_STRUCTURE_SET_STORAGE", "encode_rtstruct", "contour_points", "check_rtstruct_geometry"]

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
_DETACHED_STUDY_MANAGEMENT = UID("1.2.840.10008.3.1.2.3.1")  # what RTReferencedStudySequence names a study by
_ST_MAX = 1024
_DECIMALS = 3  # ContourData in mm: 0.001 mm, well inside the 0.01 mm geometry check
_DS_FORMAT = f"%.{_DECIMALS}f"
_DS_SEPARATED = _DS_FORMAT + "\\"



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
    date, time = now()

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
    ds.ManufacturerModelName = checked_length(algorithm.name, LO_MAX, "the algorithm name")
    ds.SoftwareVersions = checked_length(algorithm.software_version, LO_MAX, "the software version")
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
        roi.ROIName = info.name[:LO_MAX]  # the SEG's segment label, as pipeline.outputs.seg writes it
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIDerivationAlgorithmIdentificationSequence = hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version,
            parameters=parameters,
        )
        rois.append(roi)

        items = [_contour_item(n, images[contour.index], points) for n, (contour, points)
                 in enumerate(zip(contours[label], patient_points_of(series, contours[label])), start=1)]
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
        observation.RTROIIdentificationCodeSequence = [code_item(info.property_type)]
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
