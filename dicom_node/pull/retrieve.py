"""Bringing one series in from a source: C-GET, C-MOVE or WADO-RS.

C-GET: the source sends the instances back as C-STORE sub-operations over the same
association; each goes through ``receive.intake`` as a pushed instance does. C-MOVE:
the source sends them to the node's own AE title, so the running node's SCP receives
them (the source must know that AE title, host and port). WADO-RS: the series as one
multipart response, each part (a DICOM file) into ``receive.intake``. Each ends with a
``Retrieved``: how many instances were stored and how many failed. ``stop`` (an event)
ends a retrieve early: the association is aborted, the HTTP response closed.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Iterator

import pydicom
import requests
from pydicom import Dataset
from pynetdicom import StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from dicom_node.config import Source, without_credentials
from dicom_node.pull.common import PullError, SeriesFound
from dicom_node.pull.query import associate, http_args
from dicom_node.receive.intake import Intake, read_header
from dicom_node.receive.scp import TRANSFER_SYNTAXES

__all__ = ["Retrieved", "retrieve_series"]

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_WARNING = 0xB000  # some sub-operations failed
_CHUNK = 1 << 20


@dataclass
class Retrieved:
    """What a retrieve brought: instances stored, and those the source or the node failed
    (SOP UID, status, reason: for the audit event)."""

    stored: list[str] = field(default_factory=list)
    refused: list[tuple[str | None, int, str]] = field(default_factory=list)
    failed_suboperations: int = 0

    @property
    def failed(self) -> int:
        return max(len(self.refused), self.failed_suboperations)


def retrieve_series(source: Source, series: SeriesFound, *, intake: Intake, calling_ae_title: str,
                    move_destination: str, stop: threading.Event) -> Retrieved:
    """Retrieve one series by the source's protocol; ``PullError`` when it failed as a whole."""
    if source.protocol == "dicomweb":
        return _wado(source, series, intake, stop)
    if source.retrieve == "move":
        return _move(source, series, calling_ae_title, move_destination, stop)
    return _get(source, series, intake, calling_ae_title, stop)


def _identifier(series: SeriesFound) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = series.study_instance_uid
    query.SeriesInstanceUID = series.series_instance_uid
    return query


def _responses(assoc, responses, source: Source, what: str, stop: threading.Event, result: Retrieved) -> None:
    """Follow a C-GET or C-MOVE to its final response; the association is aborted on ``stop``."""
    for status, _identifier_ in responses:
        if stop.is_set():
            assoc.abort()
            raise PullError(f"source {source.name}: the {what} was stopped")
        if status is None or "Status" not in status:
            raise PullError(f"source {source.name}: no answer to the {what} (association lost or timed out)")
        code = int(status.Status)
        if code in _PENDING:
            continue
        result.failed_suboperations = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        if code in (0x0000, _WARNING):
            return
        raise PullError(f"source {source.name}: the {what} failed with status 0x{code:04X}")
    raise PullError(f"source {source.name}: the {what} ended without a final response")


def _get(source: Source, series: SeriesFound, intake: Intake, calling_ae_title: str,
         stop: threading.Event) -> Retrieved:
    result = Retrieved()
    peer = source.ae_title or ""

    def handle_store(event: evt.Event) -> int:
        try:  # decoded as the SCP decodes a pushed instance
            dataset = read_header(event.request.DataSet, event.context.transfer_syntax)
        except Exception as exc:  # an undecodable dataset
            outcome = intake.undecodable(exc)
        else:
            outcome = intake.store(dataset, event.encoded_dataset, str(event.context.transfer_syntax),
                                   str(event.request.AffectedSOPClassUID), peer,
                                   affected_sop_instance_uid=event.request.AffectedSOPInstanceUID)
        if outcome.stored:
            result.stored.append(outcome.sop_instance_uid or "")
        else:
            result.refused.append((outcome.sop_instance_uid, outcome.status, outcome.reason))
        return outcome.status

    contexts: list = [StudyRootQueryRetrieveInformationModelGet]
    contexts += [(context.abstract_syntax, TRANSFER_SYNTAXES) for context in StoragePresentationContexts]
    roles = [build_role(context.abstract_syntax, scp_role=True) for context in StoragePresentationContexts]
    assoc = associate(source, calling_ae_title, contexts, roles)
    assoc.bind(evt.EVT_C_STORE, handle_store)
    try:
        _responses(assoc, assoc.send_c_get(_identifier(series), StudyRootQueryRetrieveInformationModelGet),
                   source, "C-GET", stop, result)
    finally:
        if assoc.is_established:
            assoc.release()
    return result


def _move(source: Source, series: SeriesFound, calling_ae_title: str, move_destination: str,
          stop: threading.Event) -> Retrieved:
    result = Retrieved()
    assoc = associate(source, calling_ae_title, [StudyRootQueryRetrieveInformationModelMove])
    try:
        _responses(assoc, assoc.send_c_move(_identifier(series), move_destination,
                                            StudyRootQueryRetrieveInformationModelMove),
                   source, f"C-MOVE to {move_destination}", stop, result)
    finally:
        if assoc.is_established:
            assoc.release()
    return result


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


def _wado(source: Source, series: SeriesFound, intake: Intake, stop: threading.Event) -> Retrieved:
    result = Retrieved()
    url = (f"{str(source.url).rstrip('/')}/studies/{series.study_instance_uid}"
           f"/series/{series.series_instance_uid}")
    args = http_args(source)
    args["headers"] = {**args["headers"],
                       "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    where = without_credentials(url)
    try:
        with requests.get(url, stream=True, **args) as response:
            if not response.ok:
                raise PullError(f"WADO-RS from source {source.name} ({where}) answered HTTP {response.status_code}")
            match = _BOUNDARY.search(response.headers.get("Content-Type", ""))
            if match is None:
                raise PullError(f"WADO-RS from source {source.name}: the answer is not multipart")
            for part in _parts(response.iter_content(_CHUNK), match.group(1).encode("ascii")):
                if stop.is_set():
                    raise PullError(f"source {source.name}: the WADO-RS was stopped")
                _store_part(part, intake, source.name, result)
    except requests.RequestException as exc:
        raise PullError(f"WADO-RS from source {source.name} ({where}) failed: {type(exc).__name__}") from exc
    return result


def _store_part(part: bytes, intake: Intake, calling: str, result: Retrieved) -> None:
    """One part of the multipart answer (its headers, then a DICOM file) into the intake."""
    head, _, body = part.partition(b"\r\n\r\n")
    try:
        dataset = pydicom.dcmread(io.BytesIO(body), defer_size=1024)
        transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
        sop_class = str(dataset.SOPClassUID)
    except Exception as exc:  # not a DICOM file, or one without its meta
        outcome = intake.undecodable(exc)
    else:
        outcome = intake.store(dataset, body, transfer_syntax, sop_class, calling)
    if outcome.stored:
        result.stored.append(outcome.sop_instance_uid or "")
    else:
        result.refused.append((outcome.sop_instance_uid, outcome.status, outcome.reason))


def _parts(chunks: Iterator[bytes], boundary: bytes) -> Iterator[bytes]:
    """The parts of a multipart body as it streams in (each part held once, never the
    whole body): the bytes between one ``--boundary`` line and the next."""
    delimiter = b"\r\n--" + boundary
    buffer = b"\r\n"  # the first delimiter starts the body, without the CRLF before it
    in_part = False
    scan = 0  # where the delimiter may start: the bytes before were searched already
    for chunk in chunks:
        buffer += chunk
        while True:
            at = buffer.find(delimiter, scan)
            if at < 0:
                scan = max(0, len(buffer) - len(delimiter))
                break
            after = at + len(delimiter)
            closing = buffer[after:after + 2] == b"--"
            end = buffer.find(b"\r\n", after)
            if not closing and end < 0:
                scan = at  # the delimiter line is not complete yet
                break
            if in_part:
                yield buffer[:at]
            if closing:
                return
            in_part = True
            buffer, scan = buffer[end + 2:], 0
        if not in_part and scan > 0:  # a preamble before the first part
            buffer, scan = buffer[scan:], 0
