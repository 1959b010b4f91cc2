"""What every result object shares: how it was made, its identity and UIDs, the patient
and study it belongs to, its series number and description, and the labels present.

The SEG, the RTSTRUCT, the overlay and the report each import what they need from here;
no writer imports another. Every object's UIDs come from the same content identity
(``content_identity``: the source planes, the 4D selection and the algorithm, plus the
SEG's encoding options), with the object type added for the other objects
(``output_identity``), so the same input gives the same UIDs per object type and two
types never share one.

Where the classification reason goes: AlgorithmParameters (LT) is read back by
splitting on ',' and '=' (highdicom's reader, and most others), so each parameter value
is written with ',' -> ';', '=' -> ':', a backslash -> '/' and control characters ->
' ' (``parameter_value``).
"""

from __future__ import annotations

import copy
import datetime
import json
import unicodedata
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from pipeline.errors import PipelineError, SegEncodingError
from pipeline.input.series import Series
from pipeline.labels import SegmentInfo, segment_info
from pipeline.model.types import LabelMap
from pipeline.outputs.options import SegOptions

__all__ = [
    "POSITION_TOLERANCE_MM",
    "REPLACES",
    "LO_MAX",
    "Algorithm",
    "OutputEncodingError",
    "parameter_value",
    "algorithm_parameters",
    "code_item",
    "content_identity",
    "output_identity",
    "output_uid",
    "output_description",
    "output_series_number",
    "output_file_meta",
    "patient_and_study",
    "checked_length",
    "structure_infos",
    "label_counts",
    "present_labels",
    "now",
]

POSITION_TOLERANCE_MM = 0.01  # how far a result plane may lie from its source plane
REPLACES = "Replaces earlier: "  # SeriesDescription prefix of a SEG that supersedes one already sent
LO_MAX = 64
_LT_MAX = 10240
# Offsets from the source's SeriesNumber: the SEG takes 1000 (pipeline.outputs.seg).
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


@dataclass(frozen=True)
class Algorithm:
    """How the segmentation was made; goes into the SEG and into its UIDs.

    The preprocessing parameters are those the mode uses (None where it uses none).
    ``series_description`` leaves room for the ``REPLACES`` prefix, so a superseding SEG
    says so without cutting the description.
    """

    name: str  # e.g. "TotalSegmentator"
    version: str  # includes the weights' digest
    task: str  # e.g. "total (fast)"
    preprocessing: str  # e.g. "invert_black_background"
    sequence_class: str  # e.g. "T1"
    classification: str  # why the series was taken for that class
    series_description: str
    software_version: str
    clip_min: float | None = None
    clip_max: float | None = None
    background_percentile: float | None = None
    series_number_offset: int = 0  # added to each object's SeriesNumber (several model presets); no content
    partial: str | None = None  # what the series lacked, when processed on purpose although not whole

    def __post_init__(self) -> None:
        room = LO_MAX - len(REPLACES)
        if len(self.series_description) > room:
            raise ValueError(
                f"series description {self.series_description!r} has {len(self.series_description)} characters;"
                f" at most {room} leave room for {REPLACES!r}"
            )

    @property
    def identity(self) -> str:
        """Everything about the algorithm that decides the SEG's content, as canonical text
        (a partial series' reason only when there is one, so whole series keep their UIDs)."""
        extra = {} if self.partial is None else {"partial": self.partial}
        return json.dumps(
            {
                **extra,
                "name": self.name,
                "version": self.version,
                "task": self.task,
                "preprocessing": self.preprocessing,
                "clip_min": self.clip_min,
                "clip_max": self.clip_max,
                "background_percentile": self.background_percentile,
                "sequence_class": self.sequence_class,
                "software_version": self.software_version,
            },
            sort_keys=True,
        )


_SAFE = str.maketrans({",": ";", "=": ":", "\\": "/"})


def parameter_value(text: str) -> str:
    """``text`` as an AlgorithmParameters value that readers split back unchanged.

    Readers split the attribute on ',' and '=', so those become ';' and ':'; a backslash
    (a value separator to careless readers) becomes '/', control characters (not allowed
    in LT) a space, and outer spaces (dropped on reading) go."""
    safe = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text.translate(_SAFE))
    return safe.strip(" ")


def algorithm_parameters(algorithm: Algorithm) -> dict[str, str]:
    """The AlgorithmParameters of every segment: name -> value, each value made safe."""
    values: dict[str, object] = {
        "task": algorithm.task,
        "preprocessing": algorithm.preprocessing,
        "clip_min": algorithm.clip_min,
        "clip_max": algorithm.clip_max,
        "background_percentile": algorithm.background_percentile,
        "sequence_class": algorithm.sequence_class,
        "classification": algorithm.classification,
        "partial": algorithm.partial,
    }
    parameters = {key: parameter_value(str(value)) for key, value in values.items() if value is not None}
    if sum(len(k) + len(v) + 2 for k, v in parameters.items()) > _LT_MAX:
        raise SegEncodingError(f"the algorithm parameters exceed the {_LT_MAX} characters of AlgorithmParameters")
    return parameters


def code_item(code) -> pydicom.Dataset:
    """A plain code sequence item (modifiers are written as such, not as highdicom concepts)."""
    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def content_identity(label_map: LabelMap, algorithm: Algorithm, options: SegOptions) -> str:
    """Everything that decides the SEG's content, as canonical text for its UIDs.

    The source planes stand for their pixels (a SOP Instance UID names one content for
    good); the label array itself is left out, so a model that is not bit-for-bit
    reproducible still gives a resend the same UIDs. The superseded SEG is no content."""
    series = label_map.volume.series
    return json.dumps(
        {
            "series": series.series_instance_uid,
            "sources": sorted((s.sop_instance_uid, s.frame_number or 0) for s in series.slices),
            "selection": series.selection,
            "algorithm": algorithm.identity,
            "segmentation_type": options.segmentation_type,
            "omit_empty_frames": options.omit_empty_frames,
        },
        sort_keys=True,
    )


class OutputEncodingError(PipelineError):
    """An RTSTRUCT, overlay or report could not be encoded or does not match its source."""


def output_identity(label_map: LabelMap, algorithm: Algorithm, object_type: str, **content: object) -> str:
    """The SEG's content identity (source planes, 4D selection, algorithm) with the object
    type and whatever else decides this object's content, as canonical text.

    The SEG's own encoding options are left out: they do not change this object."""
    base = json.loads(content_identity(label_map, algorithm, SegOptions()))
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
    if len(text) > LO_MAX:
        raise OutputEncodingError(f"series description {text!r} exceeds {LO_MAX} characters")
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


def now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


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
