"""Encoding the label map as one DICOM SEG with highdicom, and checking it against its source.

One SEG per series: a segment per label present (numbered 1..N in label order), each
with SNOMED CT codes, laterality modifier, anatomic region where the table gives one
(for lesions, cysts, implants) and a display colour, the algorithm
identified (name, version, task, preprocessing), every source instance referenced,
the same study and patient, a new series. UIDs are derived from the source series and
the processing identity, so the same input processed the same way gives the same SEG
(a resend replaces rather than duplicates) and any change gives new UIDs.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from pipeline.errors import SegEncodingError
from pipeline.labels import segment_info
from pipeline.series import Series
from pipeline.volume import LabelMap

__all__ = ["Algorithm", "SegOptions", "encode_seg", "check_seg_geometry", "POSITION_TOLERANCE_MM"]

POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class SegOptions:
    """How the SEG is encoded, per destination.

    BINARY (the widest viewer support) is written uncompressed: the standard allows
    JPEG 2000 for it, but viewers decode that poorly. LABELMAP (the 2024 Label Map
    Segmentation: one frame per slice, small and fast) is written RLE Lossless.
    """

    segmentation_type: str = "BINARY"
    omit_empty_frames: bool = True

    @property
    def transfer_syntax(self) -> str:
        return ExplicitVRLittleEndian if self.segmentation_type == "BINARY" else RLELossless


@dataclass(frozen=True)
class Algorithm:
    """How the segmentation was made; goes into the SEG and into its UIDs."""

    name: str  # e.g. "TotalSegmentator"
    version: str
    task: str  # e.g. "total (fast)"
    preprocessing: str  # e.g. "invert_black_background"
    sequence_class: str  # e.g. "T1"
    classification: str  # why the series was taken for that class
    series_description: str
    software_version: str

    @property
    def identity(self) -> str:
        return "|".join(
            (self.name, self.version, self.task, self.preprocessing, self.sequence_class, self.software_version)
        )


def _coded(code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _code_item(code) -> pydicom.Dataset:
    """A plain code sequence item (modifiers are written as such, not as highdicom concepts)."""
    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _describe_segments(label_map: LabelMap, algorithm: Algorithm) -> list[hd.seg.SegmentDescription]:
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters={
            "task": algorithm.task,
            "preprocessing": algorithm.preprocessing,
            "sequence_class": algorithm.sequence_class,
            "classification": algorithm.classification[:64],
        },
    )
    descriptions = []
    for number, label in enumerate(label_map.present, start=1):
        info = segment_info(label_map.names.get(label, f"label_{label}"), label_map.codes)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=info.name[:64],
            segmented_property_category=_coded(info.category),
            segmented_property_type=_coded(info.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*info.rgb),
            anatomic_regions=[_coded(info.region)] if info.region is not None else None,
        )
        if info.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _code_item(info.type_modifier)
            ]
        if info.region is not None and info.region_modifier is not None:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_code_item(info.region_modifier)]
        descriptions.append(description)
    return descriptions


def encode_seg(
    label_map: LabelMap, algorithm: Algorithm, options: SegOptions = SegOptions()
) -> pydicom.Dataset | None:
    """A DICOM SEG of the labels present, or None when no label is present."""
    present = label_map.present
    if not present:
        return None
    series = label_map.volume.series
    if series.multi_frame:
        # One multi-frame source: highdicom places each plane by its position. It reads
        # orientation and pixel measures from the shared groups only, where many scanners
        # put them per frame; series assembly checked them equal, so share them in a copy.
        geometry = {
            "plane_positions": [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, s.position)
                                for s in series.slices],
            "plane_orientation": hd.PlaneOrientationSequence(
                hd.CoordinateSystemNames.PATIENT, series.row_direction + series.column_direction
            ),
            "pixel_measures": hd.PixelMeasuresSequence(series.pixel_spacing, series.slice_spacing),
        }
        source = copy.deepcopy(series.header)
        shared = source.SharedFunctionalGroupsSequence[0]
        shared.PlaneOrientationSequence = geometry["plane_orientation"]
        shared.PixelMeasuresSequence = geometry["pixel_measures"]
        sources = [source]
    else:
        sources = [s.header for s in series.slices]
        geometry = {}
    lookup = np.zeros(int(label_map.array.max()) + 1, dtype=np.uint16)
    lookup[present] = np.arange(1, len(present) + 1)
    dtype = np.uint8 if len(present) < 256 else np.uint16
    segments = lookup[label_map.array].astype(dtype)

    identity = [series.series_instance_uid, series.selection or "", algorithm.identity, options.segmentation_type]
    source_number = series.header.get("SeriesNumber")
    try:
        with warnings.catch_warnings():
            # highdicom's warning about an odd PatientName would print the name into the log.
            warnings.filterwarnings("ignore", message=".*intended person name")
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=segments,
                segmentation_type=hd.seg.SegmentationTypeValues(options.segmentation_type),
                segment_descriptions=_describe_segments(label_map, algorithm),
                series_instance_uid=generate_uid(entropy_srcs=["series", *identity]),
                series_number=int(source_number) + 1000 if source_number is not None else 1000,
                sop_instance_uid=generate_uid(entropy_srcs=["instance", *identity]),
                instance_number=1,
                manufacturer="dicom-node",
                manufacturer_model_name=algorithm.name,
                software_versions=algorithm.software_version,
                device_serial_number="0",
                content_label="AUTOSEG",
                content_description=f"{algorithm.sequence_class}; {algorithm.preprocessing}; {algorithm.task}"[:64],
                content_creator_name="dicom-node^automatic",
                series_description=algorithm.series_description[:64],
                omit_empty_frames=options.omit_empty_frames,
                transfer_syntax_uid=options.transfer_syntax,
                **geometry,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise SegEncodingError(f"highdicom could not encode the SEG: {exc}") from exc
    if series.multi_frame:
        _keep_used_frames(seg, series)
    check_seg_geometry(seg, label_map)
    return seg


def _referenced_frames(item: pydicom.Dataset) -> list[int]:
    """ReferencedFrameNumber as a list (empty when absent), however pydicom read it."""
    frames = item.get("ReferencedFrameNumber")
    if frames is None:
        return []
    return [int(frames)] if isinstance(frames, int) else [int(f) for f in frames]


def _source_key(item: pydicom.Dataset) -> tuple[str, int | None]:
    """(SOP instance UID, frame number or None) of a source image reference."""
    frames = _referenced_frames(item)
    frame = None if not frames else frames[0] if len(frames) == 1 else -1  # several frames: never one plane
    return str(item.ReferencedSOPInstanceUID), frame


def _keep_used_frames(seg: pydicom.Dataset, series: Series) -> None:
    """highdicom may reference every source frame at a plane's position (all time points
    of a 4D object); keep only the frame the volume was built from."""
    distances = np.array([s.distance for s in series.slices])
    normal = series.normal
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        nearest = int(np.argmin(np.abs(distances - float(np.dot(normal, position)))))
        wanted = (series.slices[nearest].sop_instance_uid, series.slices[nearest].frame_number)
        for derivation in frame.DerivationImageSequence:
            items = []
            for item in derivation.SourceImageSequence:
                if str(item.ReferencedSOPInstanceUID) == wanted[0] and wanted[1] in _referenced_frames(item):
                    item.ReferencedFrameNumber = wanted[1]
                    items.append(item)
            if not items:
                raise SegEncodingError(f"SEG frame {index} references none of the volume's source frames")
            derivation.SourceImageSequence = items


def check_seg_geometry(seg: pydicom.Dataset, label_map: LabelMap) -> None:
    """Every frame must lie exactly on the source plane it references (0.01 mm)."""
    series = label_map.volume.series
    positions = {(s.sop_instance_uid, s.frame_number): np.asarray(s.position) for s in series.slices}
    orientation = np.asarray(series.row_direction + series.column_direction)
    shared = seg.SharedFunctionalGroupsSequence[0]
    seg_orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    if not np.allclose(seg_orientation, orientation, atol=1e-4):
        raise SegEncodingError("SEG orientation differs from the source series")
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        items = [item for d in frame.DerivationImageSequence for item in d.SourceImageSequence]
        if not items:
            raise SegEncodingError(f"SEG frame {index} references no source image")
        for item in items:
            key = _source_key(item)
            if key not in positions:
                raise SegEncodingError(f"SEG frame {index} references an image outside the volume: {key}")
            if np.max(np.abs(position - positions[key])) > POSITION_TOLERANCE_MM:
                raise SegEncodingError(
                    f"SEG frame {index} lies at {position.tolist()} but its source plane at"
                    f" {positions[key].tolist()}"
                )
