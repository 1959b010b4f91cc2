"""The one masking of patient data in text that leaves the node.

Scanners copy the patient's name or ID into free text (SeriesDescription, StudyDescription,
ProtocolName: "t1 Mustermann Erika MRN778899"), and a library's error message may quote a
header value. Every string the node shows or records about a series (the status page and
its API, ``status``, the job record, the routing explanation, the log) goes through a
``PatientMask`` built from that series' header: the patient's name and each of its parts
of 3 characters or more, the patient ID, the other patient IDs and the birth date are
replaced by ``***`` wherever they appear, in any letter case. ``cut`` shortens long text
with an ellipsis, so that a 5000-character description stays a line.

Loads no DICOM library: a header is anything with ``get(keyword)`` (a pydicom dataset).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MASK", "PATIENT_KEYWORDS", "PatientMask", "cut"]

MASK = "***"
PATIENT_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
                    "PatientBirthName", "PatientMotherBirthName")
_MIN_LENGTH = 3  # shorter name components ("Li", a middle initial) would mask ordinary words
_MIN_WORD = 4  # a word inside a component ("van der Berg"): "der" would mask "header"


@dataclass(frozen=True)
class PatientMask:
    """The identifying strings of one patient, longest first, and the way they are hidden."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def of(cls, header) -> "PatientMask":
        """The mask of the patient a header names; tolerant of values pydicom cannot convert."""
        found: set[str] = set()
        for keyword in PATIENT_KEYWORDS:
            try:
                value = header.get(keyword)
            except (ValueError, TypeError, KeyError):
                continue
            found |= set(_parts(value))
        return cls.from_strings(found)

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> "PatientMask":
        found = {part for value in values for part in _split(str(value))}
        return cls(tuple(sorted(found, key=lambda s: (-len(s), s))))

    def __call__(self, text: str | None) -> str | None:
        """``text`` with every secret replaced by ``***``; None stays None."""
        if not text or not self.secrets:
            return text
        return self._pattern.sub(MASK, text)

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(secret) for secret in self.secrets), re.IGNORECASE)

    def __bool__(self) -> bool:
        return bool(self.secrets)


def cut(text: str | None, limit: int = 200) -> str | None:
    """``text`` on one line and at most ``limit`` characters, ending in an ellipsis when cut."""
    if text is None:
        return None
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _parts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _split(value: str) -> set[str]:
    """The value itself and its name components (``Mustermann^Erika`` gives
    ``Mustermann^Erika``, ``Mustermann``, ``Erika``) of 3 characters or more, and the
    words inside them of 4 or more."""
    components = {value, *re.split(r"[\\^=]", value)}
    words = set(re.split(r"[\\^=\s,]+", value))
    return ({part.strip() for part in components if len(part.strip()) >= _MIN_LENGTH}
            | {word for word in words if len(word) >= _MIN_WORD})
