"""The values the pull modules share, and their one error.

``PullError``: a query or a retrieve failed (the source unreachable, an association
refused, a failure status, an HTTP error); its message names the source and never a
patient string.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from pydicom import Dataset

from dicom_node.errors import NodeError

__all__ = ["PullError", "PullFilter", "SeriesFound", "DATE_RANGE"]

# DICOM date range: YYYYMMDD-YYYYMMDD, or open at one end; a single date
DATE_RANGE = re.compile(r"^(\d{8})?-(\d{8})?$|^\d{8}$")


class PullError(NodeError):
    """A query or retrieve from a source failed."""


@dataclass(frozen=True)
class PullFilter:
    """What to pull: each given filter narrows the query (study level: UID, accession,
    patient ID, date range; series level: modality, then a SeriesDescription regex)."""

    study_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    date: str | None = None  # DICOM range "YYYYMMDD-YYYYMMDD" (either end may be left open)
    modality: str | None = None
    series_description: str | None = None  # a regular expression, searched case-insensitively

    def __post_init__(self) -> None:
        if self.date is not None:
            date = self.date.replace("/", "").strip()
            if not DATE_RANGE.match(date) or date == "-":
                raise ValueError(f"--date {self.date!r}: give YYYYMMDD-YYYYMMDD (either end may be left open)")
            object.__setattr__(self, "date", date)
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise ValueError(f"--series-description: not a regular expression ({exc})") from exc
        if not any(asdict(self).values()):
            raise ValueError("give at least one filter (--study, --accession, --patient-id, --date, --modality,"
                             " --series-description)")

    def arguments(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def key(self, source: str) -> str:
        """The pull's name in the state store: the same source and filters, the same pull."""
        text = json.dumps({"source": source, **self.arguments()}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def description_matches(self, description: str) -> bool:
        return self.series_description is None or re.search(self.series_description, description, re.I) is not None


@dataclass(frozen=True)
class SeriesFound:
    """A series as the query answered it: its UIDs, and its series-level attributes with
    the study's (``attributes``, what the rules decide by; patient strings in it only
    for masking)."""

    study_instance_uid: str
    series_instance_uid: str
    attributes: Dataset = field(compare=False, repr=False)

    @property
    def modality(self) -> str:
        return str(self.attributes.get("Modality", "") or "")

    @property
    def description(self) -> str:
        return str(self.attributes.get("SeriesDescription", "") or "")

    @property
    def study_date(self) -> str:
        return str(self.attributes.get("StudyDate", "") or "")

    @property
    def instances(self) -> int | None:
        value = self.attributes.get("NumberOfSeriesRelatedInstances")
        try:
            return None if value in (None, "") else int(value)
        except (TypeError, ValueError):
            return None
