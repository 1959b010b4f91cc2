"""Which kind of MR image a series is, from its headers alone.

The preprint's inversion helps T1-weighted images and ruins T2-weighted ones, so the
node must know which is which before it inverts anything. ``classify_series`` decides

* whether the series is an anatomical 3D image at all (not a localizer, a mosaic/EPI
  time series, perfusion, diffusion, a field map or phase image, not several
  orientations), and
* its sequence class: T1, T2, PD or other,

and says why in words a radiologist can check. It reads, for classic and enhanced MR:
RepetitionTime, EchoTime, InversionTime, FlipAngle, ScanningSequence, SequenceVariant,
AcquisitionContrast, ImageType/FrameType; SeriesDescription only as a hint when the
physics is silent. Site rules from the config (a SeriesDescription pattern mapped to a
class) come first, for protocols these heuristics miss.

Thresholds (ms): spin echo T1 when TR < 1000 and TE < 30; T2 when TR >= 2000 and
TE >= 60; PD when TR >= 2000 and TE < 40. Gradient echo T1 when TR < 800 and TE < 10
(spoiled GRE, FLASH, MPRAGE); T2* (class other) when TE >= 15. Inversion recovery with
TI >= 1500 and long TR is FLAIR (class T2); TI < 300 is STIR (class other).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # only in annotations: the config imports this module, and stays light
    import pydicom

__all__ = ["SequenceClass", "Classification", "ClassRule", "classify_series"]


class SequenceClass(str, Enum):
    T1 = "T1"
    T2 = "T2"
    PD = "PD"
    OTHER = "other"


@dataclass(frozen=True)
class Classification:
    sequence_class: SequenceClass
    anatomical: bool
    reason: str


@dataclass(frozen=True)
class ClassRule:
    """A site rule: SeriesDescription matching ``pattern`` (regex, case-insensitive) is ``sequence_class``."""

    pattern: str
    sequence_class: SequenceClass


# ImageType / FrameType values that mark a series as not an anatomical image.
_NOT_ANATOMICAL_TYPES = {
    "LOCALIZER": "a localizer",
    "MOSAIC": "a mosaic (EPI time series)",
    "PERFUSION": "a perfusion series",
    "DIFFUSION": "a diffusion series",
    "ADC": "an ADC map",
    "TRACEW": "a diffusion trace",
    "FA": "a fractional anisotropy map",
    "MIXED": "a mixed magnitude/phase series (e.g. a field map)",
    "PHASE": "a phase image",
    "P": "a phase image",
    "B0": "a B0 field map",
    "FIELD_MAP": "a field map",
    "SCREEN SAVE": "a screen capture",
}
_NOT_ANATOMICAL_CONTRASTS = {"PERFUSION", "DIFFUSION", "FLOW_ENCODED", "MIXED", "UNKNOWN"}
_HINTS = [
    (re.compile(r"\bt1|mprage|mp-rage|tfl|vibe|flash|spgr|bravo", re.I), SequenceClass.T1),
    (re.compile(r"\bt2|flair|haste|space", re.I), SequenceClass.T2),
    (re.compile(r"\bpd\b|proton", re.I), SequenceClass.PD),
]


def _first(ds: pydicom.Dataset, *path: str):
    """A value from the top level, or from the shared or first per-frame functional group."""
    if path[-1] in ds and len(path) == 1:
        return ds.get(path[-1])
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if group not in ds or not ds[group].value:
            continue
        item = ds[group][0]
        for sequence in path[:-1]:
            if sequence not in item or not item[sequence].value:
                item = None
                break
            item = item[sequence][0]
        if item is not None and path[-1] in item:
            return item.get(path[-1])
    return ds.get(path[-1])


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [str(value)]
    return [str(v) for v in value]


def _orientations(headers: Sequence[pydicom.Dataset]) -> int:
    seen: set[tuple[float, ...]] = set()
    for ds in headers:
        value = _first(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        if value is not None:
            seen.add(tuple(round(float(v), 2) for v in value))
    return len(seen)


def classify_series(
    headers: Sequence[pydicom.Dataset], rules: Sequence[ClassRule] = ()
) -> Classification:
    """Classify a series from the headers of its image instances."""
    if not headers:
        return Classification(SequenceClass.OTHER, False, "no image instances")
    ds = headers[0]
    description = str(ds.get("SeriesDescription", "") or "")

    image_types = {t.upper() for h in headers[:1] for t in _as_list(h.get("ImageType"))}
    image_types |= {t.upper() for t in _as_list(_first(ds, "MRImageFrameTypeSequence", "FrameType"))}
    for value, meaning in _NOT_ANATOMICAL_TYPES.items():
        if value in image_types:
            return Classification(SequenceClass.OTHER, False, f"not an anatomical image: ImageType {value} ({meaning})")
    contrast = str(_first(ds, "MRImageFrameTypeSequence", "AcquisitionContrast") or ds.get("AcquisitionContrast") or "")
    if contrast.upper() in _NOT_ANATOMICAL_CONTRASTS:
        return Classification(SequenceClass.OTHER, False, f"not an anatomical image: AcquisitionContrast {contrast}")
    if _orientations(headers) > 1:
        return Classification(
            SequenceClass.OTHER,
            False,
            f"not a single 3D volume: images in {_orientations(headers)} orientations (a localizer or survey)",
        )
    scanning = {s.upper() for s in _as_list(ds.get("ScanningSequence"))}
    if "EP" in scanning:
        return Classification(SequenceClass.OTHER, False, "not an anatomical image: echo planar (EPI) acquisition")

    for rule in rules:
        if re.search(rule.pattern, description, re.I):
            return Classification(rule.sequence_class, True, f"site rule: SeriesDescription matches /{rule.pattern}/")

    if contrast.upper() in ("T1", "T2", "PROTON_DENSITY"):
        cls = {"T1": SequenceClass.T1, "T2": SequenceClass.T2, "PROTON_DENSITY": SequenceClass.PD}[contrast.upper()]
        return Classification(cls, True, f"AcquisitionContrast {contrast}")

    tr = _float(_first(ds, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
    te = _float(ds.get("EchoTime")) or _float(_first(ds, "MREchoSequence", "EffectiveEchoTime"))
    ti = _float(ds.get("InversionTime"))
    flip = _float(_first(ds, "MRTimingAndRelatedParametersSequence", "FlipAngle"))
    variant = {s.upper() for s in _as_list(ds.get("SequenceVariant"))}
    params = ", ".join(
        f"{name} {value:g}" for name, value in (("TR", tr), ("TE", te), ("TI", ti), ("FA", flip)) if value is not None
    )
    physics = _from_physics(scanning, variant, tr, te, ti)
    if physics is not None:
        cls, why = physics
        return Classification(cls, True, f"{why} ({params})")
    for pattern, cls in _HINTS:
        if pattern.search(description):
            return Classification(cls, True, f"timing inconclusive ({params or 'no TR/TE'}); SeriesDescription hints {cls.value}")
    return Classification(SequenceClass.OTHER, True, f"timing inconclusive ({params or 'no TR/TE'})")


def _from_physics(scanning, variant, tr, te, ti) -> tuple[SequenceClass, str] | None:
    if tr is None or te is None:
        return None
    if ti is not None and ti > 0 and ("IR" in scanning or ti >= 300):
        if ti >= 1500 and tr >= 4000:
            return SequenceClass.T2, "inversion recovery with long TI: FLAIR"
        if ti < 300 and "MP" not in variant:
            return SequenceClass.OTHER, "inversion recovery with short TI: STIR"
        if tr < 3000 and te < 10:
            return SequenceClass.T1, "inversion-prepared T1 (MPRAGE-like)"
    if "GR" in scanning:
        if te >= 15:
            return SequenceClass.OTHER, "gradient echo with long TE: T2*-weighted"
        if tr < 800 and te < 10:
            return SequenceClass.T1, "spoiled/prepared gradient echo with short TR and TE: T1-weighted"
        return None
    if "SE" in scanning or not scanning:
        if tr < 1000 and te < 30:
            return SequenceClass.T1, "spin echo with short TR and TE: T1-weighted"
        if tr >= 2000 and te >= 60:
            return SequenceClass.T2, "spin echo with long TR and TE: T2-weighted"
        if tr >= 2000 and te < 40:
            return SequenceClass.PD, "spin echo with long TR, short TE: proton density"
    return None
