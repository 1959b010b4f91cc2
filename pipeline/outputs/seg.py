"""Encoding the label map as one DICOM SEG with highdicom, and checking it against its source.

One SEG per series: a segment per label present (numbered 1..N in label order), each
with SNOMED CT codes, laterality modifier, anatomic region where the table gives one
(for lesions, cysts, implants) and a display colour, the algorithm
identified (name, version, task, preprocessing), every source instance referenced,
the same study and patient (Type 2 attributes the source lacks are written empty), a
new series. UIDs are derived from everything that decides the content (the source
planes, the model and its weights, the preprocessing, the encoding options), so the same
input processed the same way gives the same SEG (a resend replaces rather than
duplicates) and any change gives new UIDs.

Where the classification reason goes: AlgorithmParameters (LT) is read back by splitting
on ',' and '=' (highdicom's reader, and most others), so each parameter value is written
with ',' -> ';', '=' -> ':', a backslash -> '/' and control characters -> ' '. The exact
reason is kept in the SEG's ImageComments (General Image module, LT, in the Segmentation
IOD), on its line starting ``Classification: ``; the job record keeps it too.
"""

from __future__ import annotations

import copy
import warnings

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from pipeline.errors import SegEncodingError
from pipeline.input.series import Series
from pipeline.labels import segment_info
from pipeline.model.types import LabelMap
from pipeline.outputs.common import (
    POSITION_TOLERANCE_MM,
    REPLACES,
    Algorithm,
    algorithm_parameters,
    code_item,
    content_identity,
)
from pipeline.outputs.options import SegOptions

# highdicom warns about an unusual PatientName with the name in the message, which would put
# it into the node's log. Installed once, for every thread (``warnings.catch_warnings``
# changes the process-wide filters and is not safe while several threads encode).
warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name")

__all__ = ["encode_seg", "check_seg_geometry"]

_LO_MAX = 64
# Type 2 attributes highdicom copies from the first source; it fails when one is absent.
_TYPE_2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDate",
    "StudyTime",
)

# Type 3 sequences of the patient and study modules highdicom copies from the first source.
_OPTIONAL_SEQUENCES_FROM_SOURCE = (
    "ProcedureCodeSequence",
    "ReferencedStudySequence",
    "ReferencedPatientSequence",
    "OtherPatientIDsSequence",
)


def _coded(code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _describe_segments(label_map: LabelMap, algorithm: Algorithm) -> list[hd.seg.SegmentDescription]:
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters=algorithm_parameters(algorithm),
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
                code_item(info.type_modifier)
            ]
        if info.region is not None and info.region_modifier is not None:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [code_item(info.region_modifier)]
        descriptions.append(description)
    return descriptions


def encode_seg(
    label_map: LabelMap,
    algorithm: Algorithm,
    options: SegOptions = SegOptions(),
    *,
    supersedes: str | None = None,
) -> pydicom.Dataset | None:
    """A DICOM SEG of the labels present, or None when no label is present.

    ``supersedes`` is the SeriesInstanceUID of an earlier SEG of this source series that
    was already sent: the descriptions then say this one replaces it. It is not part of
    the UIDs (they name the content); when it equals the new series UID the content is
    the same and the SEG is written as a plain resend.
    """
    present = label_map.present
    if not present:
        return None
    if supersedes is not None and not UID(supersedes).is_valid:
        raise SegEncodingError(f"the superseded SEG series UID {supersedes!r} is not a valid UID")
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
        sources = [_with_type_2(source)]
    else:
        headers = [s.header for s in series.slices]
        sources = [_with_type_2(headers[0]), *headers[1:]]
        geometry = {}
    lookup = np.zeros(int(label_map.array.max()) + 1, dtype=np.uint16)
    lookup[present] = np.arange(1, len(present) + 1)
    dtype = np.uint8 if len(present) < 256 else np.uint16
    segments = lookup[label_map.array].astype(dtype)

    identity = content_identity(label_map, algorithm, options)
    series_uid = generate_uid(entropy_srcs=["series", identity])
    replaces = supersedes if supersedes is not None and supersedes != series_uid else None
    source_number = series.header.get("SeriesNumber")
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=segments,
            segmentation_type=hd.seg.SegmentationTypeValues(options.segmentation_type),
            segment_descriptions=_describe_segments(label_map, algorithm),
            series_instance_uid=series_uid,
            series_number=(int(source_number) if source_number is not None else 0) + 1000
            + algorithm.series_number_offset,
            sop_instance_uid=generate_uid(entropy_srcs=["instance", identity]),
            instance_number=1,
            manufacturer="dicom-node",
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.software_version,
            device_serial_number="0",
            content_label="AUTOSEG",
            content_description=_content_description(algorithm, replaces is not None),
            content_creator_name="dicom-node^automatic",
            series_description=(REPLACES if replaces else "") + algorithm.series_description,
            omit_empty_frames=options.omit_empty_frames,
            transfer_syntax_uid=options.transfer_syntax,
            # set below: highdicom refuses some valid values, such as "\ISO 2022 IR 87"
            specific_character_set=None,
            **geometry,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise SegEncodingError(f"highdicom could not encode the SEG: {exc}") from exc
    if "SpecificCharacterSet" in sources[0]:
        # The copied names are encoded as the source's were: same character set, exactly.
        seg.SpecificCharacterSet = sources[0].SpecificCharacterSet
    seg.ImageComments = _image_comments(algorithm, replaces)
    if series.multi_frame:
        _keep_used_frames(seg, series)
    check_seg_geometry(seg, label_map)
    return seg


def _with_type_2(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source``, or a copy of it fit to be copied from: the Type 2 attributes it lacks
    present and empty, and the optional (Type 3) patient and study sequences that it
    has empty left out (an empty Type 3 sequence is invalid, and highdicom would copy it).

    A copy, so the caller's header stays as it was read."""
    missing = [keyword for keyword in _TYPE_2_FROM_SOURCE if keyword not in source]
    empty = [keyword for keyword in _OPTIONAL_SEQUENCES_FROM_SOURCE
             if keyword in source and not source[keyword].value]
    if not missing and not empty:
        return source
    patched = copy.deepcopy(source)
    for keyword in missing:
        setattr(patched, keyword, None)
    for keyword in empty:
        delattr(patched, keyword)
    return patched


def _content_description(algorithm: Algorithm, replaces: bool) -> str:
    """Class, preprocessing and task in 64 characters; a long task (named in the
    algorithm parameters too) is left out rather than cut."""
    head = ["replaces earlier SEG"] if replaces else []
    parts = [*head, algorithm.sequence_class, algorithm.preprocessing, algorithm.task]
    text = "; ".join(parts)
    if len(text) > _LO_MAX:
        text = "; ".join(parts[:-1])
    if len(text) > _LO_MAX:
        raise SegEncodingError(f"content description {text!r} exceeds {_LO_MAX} characters")
    return text


def _image_comments(algorithm: Algorithm, replaces: str | None) -> str:
    """The exact classification reason (AlgorithmParameters carries it made safe) and
    the SEG this one replaces."""
    lines = [f"Classification: {algorithm.classification}"]
    if algorithm.partial is not None:
        lines.append(f"PARTIAL: made on purpose from a series that is not whole: {algorithm.partial}")
    if replaces is not None:
        lines.append(f"Replaces the earlier SEG series {replaces} of this source series.")
    return "\n".join(lines)


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
