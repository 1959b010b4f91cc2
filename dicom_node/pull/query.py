"""Finding series on a source: C-FIND (study root) or QIDO-RS, at study then series level.

The series-level query asks for every attribute the rules and the classifier read
(``SERIES_KEYS``), so that a series can be decided before it is retrieved
(``pull.decide``); a PACS that does not return them leaves the decision to the node
after receipt. Patient strings are requested only so that descriptions can be masked;
they are never logged.
"""

from __future__ import annotations

import base64
import logging
from typing import Iterator

import requests
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.config import Source, without_credentials
from dicom_node.errors import ConfigError
from dicom_node.pull.common import PullError, PullFilter, SeriesFound
from dicom_node.tls import client_context

__all__ = ["SERIES_KEYS", "STUDY_KEYS", "find_series", "associate", "http_args"]

log = logging.getLogger(__name__)

STUDY_KEYS = ("StudyDate", "AccessionNumber", "StudyDescription", "PatientName", "PatientID", "PatientBirthDate")
# what series_facts and classify_series read, where a PACS can answer it at series level
SERIES_KEYS = (
    "Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined", "ProtocolName", "Manufacturer",
    "MagneticFieldStrength", "SliceThickness", "ImageType", "ScanningSequence", "SequenceVariant", "SequenceName",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "MRAcquisitionType", "AcquisitionContrast",
    "NumberOfSeriesRelatedInstances",
)
_PENDING = (0xFF00, 0xFF01)


def find_series(source: Source, calling_ae_title: str, filters: PullFilter) -> list[SeriesFound]:
    """Every series of the studies matching ``filters`` that matches its series filters."""
    if source.protocol == "dimse":
        found = _find_dimse(source, calling_ae_title, filters)
    else:
        found = _find_qido(source, filters)
    unique = {}  # a PACS may answer a series twice (a study under two patients, as Orthanc keeps it)
    for series in found:
        unique.setdefault(series.series_instance_uid, series)
    return [series for series in unique.values() if filters.description_matches(series.description)]


# -- DIMSE ------------------------------------------------------------------------------
def associate(source: Source, calling_ae_title: str, contexts, roles=None):
    """An established association to the source with ``contexts`` requested (and
    ``roles``: SCP/SCU role selection, for C-GET); ``PullError`` when there is none."""
    ae = AE(ae_title=calling_ae_title)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = source.timeout_seconds
    ae.connection_timeout = min(source.timeout_seconds, 30.0)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    tls_args = (client_context(source.tls), source.host) if source.tls else None
    peer = source.connection.peer
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, tls_args=tls_args,
                             ext_neg=roles or None)
    except (OSError, ValueError) as exc:
        raise PullError(f"cannot associate with source {source.name} ({peer}): {exc}") from exc
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "did not accept an association"
        raise PullError(f"source {source.name} ({peer}) {what}")
    return assoc


def _find(assoc, query: Dataset, what: str, source: Source) -> Iterator[Dataset]:
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status is None or "Status" not in status:
            raise PullError(f"source {source.name}: no answer to the {what} C-FIND (association lost or timed out)")
        code = int(status.Status)
        if code in _PENDING:
            if identifier is not None:
                yield identifier
        elif code == 0x0000:
            return
        else:
            raise PullError(f"source {source.name}: the {what} C-FIND failed with status 0x{code:04X}")


def _find_dimse(source: Source, calling_ae_title: str, filters: PullFilter) -> list[SeriesFound]:
    study = Dataset()
    study.QueryRetrieveLevel = "STUDY"
    study.StudyInstanceUID = filters.study_uid or ""
    for keyword in STUDY_KEYS:
        setattr(study, keyword, "")
    study.StudyDate = filters.date or ""
    study.AccessionNumber = filters.accession or ""
    study.PatientID = filters.patient_id or ""
    assoc = associate(source, calling_ae_title, [StudyRootQueryRetrieveInformationModelFind])
    try:
        studies = list(_find(assoc, study, "study-level", source))
        found: list[SeriesFound] = []
        asked = set()
        for answer in studies:
            study_uid = str(answer.get("StudyInstanceUID", "") or "")
            if not study_uid or study_uid in asked:
                continue
            asked.add(study_uid)
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            for keyword in SERIES_KEYS:
                setattr(query, keyword, "")
            query.Modality = filters.modality or ""
            for series in _find(assoc, query, "series-level", source):
                found.extend(_series(answer, series, filters))
        return found
    finally:
        assoc.release()


def _series(study: Dataset, series: Dataset, filters: PullFilter) -> list[SeriesFound]:
    """The answer as a ``SeriesFound`` (none when it lacks its UID or another modality
    came back): the series' attributes present, with the study's under them."""
    series_uid = str(series.get("SeriesInstanceUID", "") or "")
    if not series_uid:
        return []
    attributes = Dataset()
    for element in study:
        if element.keyword in STUDY_KEYS and element.value not in (None, ""):
            attributes.add(element)
    for element in series:
        if element.value not in (None, "") and element.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            attributes.add(element)
    found = SeriesFound(str(study.StudyInstanceUID), series_uid, attributes)
    if filters.modality and found.modality.upper() != filters.modality.upper():
        return []
    return [found]


# -- DICOMweb ---------------------------------------------------------------------------
def http_args(source: Source) -> dict:
    """``requests`` keyword arguments for the source: its credentials (read now, so a
    rotated secret is used) and what its certificate is checked against."""
    headers = {}
    if source.auth is not None:
        try:
            secret = source.auth.secret()
        except ConfigError as exc:
            raise PullError(f"source {source.name}: {exc}") from exc
        if source.auth.type == "bearer":
            headers["Authorization"] = f"Bearer {secret}"
        else:
            token = base64.b64encode(f"{source.auth.username}:{secret}".encode("utf-8")).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
    verify = str(source.ca_certificates) if source.ca_certificates else source.verify_tls
    return {"headers": headers, "verify": verify, "timeout": source.timeout_seconds, "allow_redirects": False}


def _qido(source: Source, path: str, params: list[tuple[str, str]]) -> list[dict]:
    url = str(source.url).rstrip("/") + path
    args = http_args(source)
    args["headers"] = {**args["headers"], "Accept": "application/dicom+json"}
    try:
        response = requests.get(url, params=params, **args)
    except requests.RequestException as exc:
        raise PullError(f"QIDO-RS to source {source.name} ({without_credentials(url)}) failed:"
                        f" {type(exc).__name__}") from exc
    if response.status_code == 204:
        return []
    if not response.ok:
        raise PullError(f"QIDO-RS to source {source.name} ({without_credentials(url)}) answered"
                        f" HTTP {response.status_code}")
    try:
        answer = response.json()
    except ValueError as exc:
        raise PullError(f"QIDO-RS to source {source.name}: the answer is not JSON") from exc
    if not isinstance(answer, list):
        raise PullError(f"QIDO-RS to source {source.name}: the answer is not a list")
    return answer


def _dataset(item: dict) -> Dataset:
    return Dataset.from_json({tag: value for tag, value in item.items() if "BulkDataURI" not in value})


def _find_qido(source: Source, filters: PullFilter) -> list[SeriesFound]:
    params = [("includefield", keyword) for keyword in STUDY_KEYS]
    for keyword, value in (("StudyInstanceUID", filters.study_uid), ("StudyDate", filters.date),
                           ("AccessionNumber", filters.accession), ("PatientID", filters.patient_id)):
        if value:
            params.append((keyword, value))
    found: list[SeriesFound] = []
    asked = set()
    for item in _qido(source, "/studies", params):
        study = _dataset(item)
        study_uid = str(study.get("StudyInstanceUID", "") or "")
        if not study_uid or study_uid in asked:
            continue
        asked.add(study_uid)
        series_params = [("includefield", keyword) for keyword in SERIES_KEYS]
        if filters.modality:
            series_params.append(("Modality", filters.modality))
        for series_item in _qido(source, f"/studies/{study_uid}/series", series_params):
            found.extend(_series(study, _dataset(series_item), filters))
    return found
