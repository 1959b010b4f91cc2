"""The facts a routing rule can match, read from a series' first image header.

Tolerant of what scanners write: a missing or unreadable number is None, a missing
string is "". Text that repeats the patient's name (or a part of it of 3+ characters),
ID or birth date is masked as ``***`` (``pipeline.masking``), so that no fact, and no
explanation, carries them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pydicom
from pydicom.multival import MultiValue

from pipeline.input.classify import Classification
from pipeline.masking import PatientMask
from pipeline.routing.rules import SeriesFacts

__all__ = ["series_facts"]


def series_facts(
    headers: Sequence[pydicom.Dataset], classification: Classification, calling_ae_title: str
) -> SeriesFacts:
    """The facts of a series from its first image header and the classifier's verdict.

    Tolerant: a missing or unreadable number is None, a missing string is "". Text that
    repeats the patient's name (or a part of it of 3+ characters), ID or birth date is
    masked as ``***``, so that no fact, and no explanation, carries them.
    """
    if not headers:
        raise ValueError("a series without image headers has no facts to route by")
    ds = headers[0]
    patient = PatientMask.of(ds)
    return SeriesFacts(
        modality=_masked(_text(ds, "Modality"), patient),
        body_part_examined=_masked(_text(ds, "BodyPartExamined"), patient),
        series_description=_masked(_text(ds, "SeriesDescription"), patient),
        study_description=_masked(_text(ds, "StudyDescription"), patient),
        protocol_name=_masked(_text(ds, "ProtocolName"), patient),
        manufacturer=_masked(_text(ds, "Manufacturer"), patient),
        magnetic_field_strength=_number(ds, "MagneticFieldStrength"),
        slice_thickness=_slice_thickness(ds),
        calling_ae_title=(calling_ae_title or "").strip(),
        sequence_class=classification.sequence_class,
        anatomical=classification.anatomical,
        classification_reason=classification.reason,
    )


def _masked(text: str, patient: PatientMask) -> str:
    return patient(text) or ""


def _value(ds: pydicom.Dataset, keyword: str):
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, KeyError):  # an element pydicom cannot convert
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _to_float(value) -> float | None:
    if value is None or isinstance(value, (list, tuple, MultiValue)):
        return None
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    return _to_float(_value(ds, keyword))


def _slice_thickness(ds: pydicom.Dataset) -> float | None:
    """SliceThickness: top level (classic), else the shared or first frame's PixelMeasuresSequence (enhanced)."""
    found = _number(ds, "SliceThickness")
    if found is not None:
        return found
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = _value(ds, group)
        if not items:
            continue
        measures = _value(items[0], "PixelMeasuresSequence")
        if measures:
            found = _number(measures[0], "SliceThickness")
            if found is not None:
                return found
    return None
