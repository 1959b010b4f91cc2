"""Encoding the structures' volumes as a TID 1500 Measurement Report (Comprehensive 3D SR).

One report per series, built with highdicom.sr: a ``MeasurementReport`` whose
observer is the algorithm (a device), with one ``VolumetricROIMeasurementsAndQualitativeEvaluations``
(TID 1411) per structure present, in label order: its tracking identifier (the
structure's name and a UID), finding category and type (the SEG's SNOMED CT codes),
finding site with laterality where the code table gives one, the algorithm (name and
version), and one measurement, Volume (SCT 118565006) in ml (UCUM ``ml``): the structure's voxel count times
the voxel volume (row spacing x column spacing x slice spacing).

The region each volume belongs to: the SEG's segment (``ReferencedSegment``, with the
source series it was made from) when the SEG is given; otherwise the source images
themselves, as the structure's outline on each image it lies on (``ImageRegion``, one
closed polyline in pixel coordinates per image: the RTSTRUCT's contours, the pieces of
one slice joined by zero-width cuts). The second form is larger and slower to build
(highdicom spends milliseconds per content item); a job that makes a SEG anyway should
pass it.
"""

from __future__ import annotations


import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from pipeline.labels import Code
from pipeline.rtstruct_writer import (
    OutputEncodingError,
    output_description,
    output_identity,
    output_series_number,
    output_uid,
    patient_and_study,
    structure_contours,
    structure_infos,
)
from pipeline.seg_writer import Algorithm
from pipeline.series import Series
from pipeline.volume import LabelMap

__all__ = ["COMPREHENSIVE_3D_SR_STORAGE", "MILLILITRE", "encode_report", "structure_volumes", "voxel_volume_ml"]

COMPREHENSIVE_3D_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.34")
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_SEGMENTATION_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def voxel_volume_ml(series: Series) -> float:
    """The volume of one voxel of the grid, in ml."""
    row_spacing, column_spacing = series.pixel_spacing
    return row_spacing * column_spacing * series.slice_spacing / 1000.0


def structure_volumes(label_map: LabelMap) -> dict[int, float]:
    """label -> volume in ml (voxel count x voxel volume) of every label present."""
    counts = np.bincount(label_map.array.ravel())
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


def _referenced_segment(seg: pydicom.Dataset, number: int, series: Series) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        str(seg.SOPClassUID), str(seg.SOPInstanceUID), number,
        source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid),
    )


def _regions(label_map: LabelMap, contours) -> list[hd.sr.ImageRegion]:
    series = label_map.volume.series
    regions = []
    for contour in contours:
        plane = series.slices[contour.index]
        # SCOORD pixel coordinates: (column, row), (0, 0) the top left corner of the
        # first pixel, so a pixel centre is at +0.5; a closed polyline repeats its start
        points = contour.points[:, ::-1] + 0.5
        source = hd.sr.SourceImageForRegion(
            str(series.header.SOPClassUID), plane.sop_instance_uid,
            [plane.frame_number] if plane.frame_number is not None else None,
        )
        regions.append(hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, np.vstack([points, points[:1]]), source))
    return regions


def _finding_sites(info) -> list[hd.sr.FindingSite] | None:
    if info.region is not None:
        laterality = _coded(info.region_modifier) if info.region_modifier is not None else None
        return [hd.sr.FindingSite(_coded(info.region), laterality=laterality)]
    if info.type_modifier is not None:
        return [hd.sr.FindingSite(_coded(info.property_type), laterality=_coded(info.type_modifier))]
    return None


def _evidence(series: Series) -> list[Dataset]:
    """The source instances, for highdicom's evidence list: each once, a copy of its
    header with the Type 2 patient and study attributes present."""
    headers = {}
    for plane in series.slices:
        if plane.sop_instance_uid not in headers:
            header = plane.header
            item = patient_and_study(header)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
                item[keyword] = header[keyword]
            headers[plane.sop_instance_uid] = item
    return list(headers.values())


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

    # name and version only: the parameters are in the SEG and its description, and
    # highdicom's cost grows with every content item (seven parameters, seven items a group)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=str(generate_uid(entropy_srcs=["device", algorithm.name, algorithm.version])),
        name=algorithm.name, manufacturer_name="dicom-node", model_name=algorithm.task,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device),
    )
    groups = []
    for label in present:
        info = infos[label]
        tracking = hd.sr.TrackingIdentifier(uid=output_uid(identity, "REPORT", f"tracking {label}"),
                                            identifier=info.name[:64])  # the SEG's segment label
        where = (
            {"referenced_segment": _referenced_segment(seg, numbers[label], series)}
            if seg is not None else {"referenced_regions": _regions(label_map, contours[label])}
        )
        volume = hd.sr.Measurement(name=codes.SCT.Volume, value=volumes[label], unit=MILLILITRE)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=_coded(info.property_type),
            finding_category=_coded(info.category),
            finding_sites=_finding_sites(info),
            algorithm_id=algorithm_id,
            measurements=[volume],
            **where,
        ))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.cid100.MRIUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    # the source instances first: the report takes its patient and study from the first
    evidence = _evidence(series) + ([seg] if seg is not None else [])
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=output_uid(identity, "REPORT", "series"),
            series_number=output_series_number(series, "REPORT"),
            sop_instance_uid=output_uid(identity, "REPORT", "instance"),
            instance_number=1,
            manufacturer="dicom-node",
            is_complete=True,
            series_description=output_description(algorithm, "REPORT"),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputEncodingError(f"highdicom could not encode the report: {exc}") from exc
    if "SpecificCharacterSet" in evidence[0]:
        sr.SpecificCharacterSet = evidence[0].SpecificCharacterSet
    return sr
