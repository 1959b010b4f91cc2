"""The audit trail: who sent which study, what left for where, who pressed "Process again".

Each event is one JSON object, written as a line to ``audit.path`` and, with
``audit.syslog``, sent as an RFC 5424 message over UDP (RFC 5426) to a site's collector.
The vocabulary is DICOM's audit messages (PS3.15 A.5, the events of IHE ATNA), in JSON
rather than its XML schema: ``event`` and ``event_id`` (e.g. "DICOM Instances
Transferred", 110104), ``event_type`` where A.5 has one, ``action`` (C, R, U, D, E),
``outcome`` (0 success, 4 minor failure, 8 serious failure) with its ``reason``, ``time``
(UTC), ``source`` (this node), ``who`` (the participant that acted: the calling AE title
and address, the page's client address, or the node itself), ``peer`` (the other side of
a transfer) and ``what`` (study, series and SOP instance UIDs, job ids: never a name,
ID, birth date or description of a patient).

Writing never blocks the caller: ``emit`` puts the event on a bounded queue and one
thread writes it (a batch at a time, then ``fsync``). A full queue drops the event and
counts it; a write that fails (a full disk) keeps its batch and is tried again with
back-off. Either makes ``problem`` (the readiness check ``audit``) name what is wrong,
until the events are written again; C-STOREs are answered meanwhile. A file moved away
(logrotate) is noticed and a new one opened.
"""

from __future__ import annotations

import datetime
import enum
import errno
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import AuditSettings, SyslogSettings
from pipeline.masking import cut

__all__ = ["Event", "Action", "Outcome", "Audit", "SYSLOG_MAX_BYTES", "rfc5424"]

log = logging.getLogger(__name__)

_QUEUE_SIZE = 10_000  # events waiting to be written; more are dropped (and readiness fails)
_BATCH = 500  # events written before one fsync
_MAX_BACKOFF_SECONDS = 30.0
SYSLOG_MAX_BYTES = 8192  # rsyslog's default message size; longer events go in parts


class Event(str, enum.Enum):
    """PS3.15 A.5.3 event names, with their EventID codes (DCM)."""

    APPLICATION_ACTIVITY = "Application Activity"
    INSTANCES_ACCESSED = "DICOM Instances Accessed"
    INSTANCES_TRANSFERRED = "DICOM Instances Transferred"
    STUDY_DELETED = "DICOM Study Deleted"
    SECURITY_ALERT = "Security Alert"
    USER_AUTHENTICATION = "User Authentication"

    @property
    def code(self) -> str:
        return _EVENT_CODES[self]


_EVENT_CODES = {
    Event.APPLICATION_ACTIVITY: "110100",
    Event.INSTANCES_ACCESSED: "110103",
    Event.INSTANCES_TRANSFERRED: "110104",
    Event.STUDY_DELETED: "110105",
    Event.SECURITY_ALERT: "110113",
    Event.USER_AUTHENTICATION: "110114",
}


class Action(str, enum.Enum):
    """EventActionCode: create, read, update, delete, execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(int, enum.Enum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8

    @property
    def text(self) -> str:
        return self.name.lower().replace("_", " ")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _what(study: str | None = None, series: str | None = None, sops: Iterable[str] = (),
          **more: Any) -> dict[str, Any]:
    what: dict[str, Any] = {"study_instance_uid": study, "series_instance_uid": series}
    sop_list = list(sops)
    if sop_list:
        what["sop_instance_uids"] = sop_list
    what.update({key: value for key, value in more.items() if value is not None})
    return what


class Audit:
    """The node's audit trail; ``Audit.off()`` records nothing. ``start`` runs the writer,
    ``close`` drains it. Every ``record_*`` method returns at once."""

    def __init__(self, settings: AuditSettings, *, ae_title: str) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.path: Path | None = settings.path  # set by the config's loading (beside storage.state_db)
        if self.enabled and self.path is None:
            raise ValueError("audit.path is not set")
        self.source = {"ae_title": ae_title, "host": socket.gethostname()}
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=_QUEUE_SIZE)
        self._pending: list[dict[str, Any]] = []  # a batch whose write failed, tried again
        self._file: Any = None
        self._inode: tuple[int, int] | None = None
        self._syslog: _SyslogSink | None = (
            _SyslogSink(settings.syslog, self.source["host"]) if self.enabled and settings.syslog else None)
        self._lock = threading.Lock()
        self._dropped = 0  # since start
        self._dropped_unreported = 0  # since the last "Audit Recording Stopped" event
        self._write_error: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def off(cls) -> "Audit":
        """An audit that records nothing (audit.enabled false, tests, the CLI)."""
        return cls(AuditSettings(enabled=False), ae_title="-")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()
        log.info("audit trail to %s%s", self.path,
                 f" and syslog {self.settings.syslog.host}:{self.settings.syslog.port}" if self.settings.syslog else "")

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``), then stop."""
        if self._thread is None:
            return
        self._stop.set()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._syslog is not None:
            self._syslog.close()

    @property
    def dropped(self) -> int:
        return self._dropped

    def problem(self) -> str | None:
        """The readiness check ``audit``: None while every event is being written."""
        if not self.enabled:
            return None
        problems = []
        with self._lock:
            if self._write_error is not None:
                problems.append(f"cannot write the audit file {self.path}: {self._write_error}")
            if self._dropped_unreported:
                problems.append(f"{self._dropped} audit event(s) dropped since start (the queue of"
                                f" {_QUEUE_SIZE} was full)")
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            problems.append("the audit writer thread is not running")
        if self._syslog is not None and self._syslog.error is not None:
            problems.append(f"audit.syslog {self._syslog.where}: {self._syslog.error}")
        return "; ".join(problems) or None

    # -- the events ---------------------------------------------------------------------
    def record_application(self, event_type: str, *, detail: Mapping[str, Any] | None = None) -> None:
        """Application Start / Stop, the configuration the node runs with (its digest and what it names)."""
        self.emit(Event.APPLICATION_ACTIVITY, Action.EXECUTE, Outcome.SUCCESS, event_type=event_type,
                  who=self._node(), what=dict(detail or {}))

    def record_association(self, *, accepted: bool, calling_ae: str, called_ae: str, address: str, port: int | None,
                           reason: str | None = None) -> None:
        """An association accepted (User Authentication, Login) or rejected (Security Alert)."""
        who = {"ae_title": calling_ae.strip(), "address": address, "port": port}
        if accepted:
            self.emit(Event.USER_AUTHENTICATION, Action.EXECUTE, Outcome.SUCCESS, event_type="Login",
                      who=who, what={"called_ae_title": called_ae.strip()})
        else:
            self.emit(Event.SECURITY_ALERT, Action.EXECUTE, Outcome.MINOR_FAILURE, event_type="Node Authentication",
                      who=who, what={"called_ae_title": called_ae.strip()}, reason=reason)

    def record_received(self, *, calling_ae: str, address: str, study: str | None, series: str | None,
                        received: Sequence[str], refused: Sequence[tuple[str | None, int, str]]) -> None:
        """One series over one association: the instances stored and those refused (SOP UID,
        status, reason)."""
        outcome = Outcome.SUCCESS if not refused else (Outcome.MINOR_FAILURE if received else Outcome.SERIOUS_FAILURE)
        statuses = sorted({f"0x{status:04X}" for _, status, _ in refused})
        reason = None if not refused else (
            f"{len(refused)} instance(s) refused ({', '.join(statuses)}): {refused[-1][2]}")
        self.emit(Event.INSTANCES_TRANSFERRED, Action.CREATE, outcome, who={
            "ae_title": calling_ae.strip(), "address": address, "role": "source"},
            peer={**self.source, "role": "destination"},
            what=_what(study, series, received, received_count=len(received), refused_count=len(refused),
                       refused=[{"sop_instance_uid": sop, "status": f"0x{status:04X}"}
                                for sop, status, _ in refused] or None),
            reason=reason)

    def record_job_ended(self, *, job_id: int, state: str, failed: bool, study: str, series: str,
                         reason: str | None, reprocess_of: int | None = None) -> None:
        """A job reached its outcome (sent, no_result, skipped, superseded, failed)."""
        self.emit(Event.INSTANCES_ACCESSED, Action.EXECUTE,
                  Outcome.SERIOUS_FAILURE if failed else Outcome.SUCCESS, who=self._node(),
                  what=_what(study, series, job_id=job_id, job_state=state, reprocess_of=reprocess_of), reason=reason)

    def record_sent(self, *, job_id: int, destination: str, peer: str, object_key: str, study: str | None,
                    series: str | None, sops: Sequence[str], ok: bool, final: bool, error: str | None = None,
                    warning: str | None = None) -> None:
        """One send attempt of one object to one destination: sent, or failed (``final``:
        no attempt follows)."""
        outcome = Outcome.SUCCESS if ok else (Outcome.SERIOUS_FAILURE if final else Outcome.MINOR_FAILURE)
        self.emit(Event.INSTANCES_TRANSFERRED, Action.READ, outcome, who={**self._node(), "role": "source"},
                  peer={"destination": destination, "peer": peer, "role": "destination"},
                  what=_what(study, series, sops, job_id=job_id, object=object_key,
                             retried=None if ok else not final),
                  reason=error if not ok else (f"warning: {warning}" if warning else None))

    def record_page_action(self, *, client: str, action: str, ok: bool, job_id: int | None, status: int,
                           study: str | None = None, series: str | None = None, new_job: int | None = None,
                           reason: str | None = None) -> None:
        """An action on the status page (``retry`` of a job; ``pull``, which names no job), by
        the client's address; refused ones too."""
        restricted = not ok and status in (401, 403)  # refused for want of the right token
        self.emit(Event.SECURITY_ALERT if restricted else Event.INSTANCES_ACCESSED, Action.EXECUTE,
                  Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
                  event_type="Use of Restricted Function" if restricted else None,
                  who={"address": client, "role": "status page"},
                  what=_what(study, series, job_id=job_id, page_action=action, new_job=new_job if ok else None,
                             http_status=status), reason=reason)

    def record_review(self, *, who: Mapping[str, Any], decision: str, ok: bool, job_id: int,
                      study: str | None = None, series: str | None = None, status: int | None = None,
                      reason: str | None = None) -> None:
        """A reviewer's decision on a job's held objects (``approved``, ``rejected``; the
        node's ``expired``), by the page's client or the operator: DICOM Instances
        Accessed, Update (their release changed); one refused for want of the right token
        is a Security Alert, Use of Restricted Function."""
        restricted = not ok and status in (401, 403)
        self.emit(Event.SECURITY_ALERT if restricted else Event.INSTANCES_ACCESSED,
                  Action.EXECUTE if restricted else Action.UPDATE, Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
                  event_type="Use of Restricted Function" if restricted else None, who=dict(who),
                  what=_what(study, series, job_id=job_id, review=decision, http_status=status), reason=reason)

    def record_deleted(self, *, study: str, series: str, sops: Sequence[str], jobs: Sequence[int], reason: str) -> None:
        """Retention deleted a series' instances and its jobs' results."""
        self.emit(Event.STUDY_DELETED, Action.DELETE, Outcome.SUCCESS, who=self._node(),
                  what=_what(study, series, sops, jobs=list(jobs), instance_count=len(sops)), reason=reason)

    def _node(self) -> dict[str, Any]:
        return {**self.source, "role": "node"}

    # -- the queue and the writer -------------------------------------------------------
    def emit(self, event: Event, action: Action, outcome: Outcome, *, who: Mapping[str, Any],
             what: Mapping[str, Any], event_type: str | None = None, peer: Mapping[str, Any] | None = None,
             reason: str | None = None) -> None:
        if not self.enabled:
            return
        record = self._event(event, action, outcome, who=who, what=what, event_type=event_type, peer=peer,
                             reason=reason)
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._dropped += 1
                self._dropped_unreported += 1
                first = self._dropped_unreported == 1
            if first:
                log.error("audit: the queue of %d events is full; events are dropped until it drains", _QUEUE_SIZE)

    def _event(self, event: Event, action: Action, outcome: Outcome, *, who: Mapping[str, Any],
               what: Mapping[str, Any], event_type: str | None = None, peer: Mapping[str, Any] | None = None,
               reason: str | None = None) -> dict[str, Any]:
        """One event as it is written: a JSON object."""
        return {
            "time": _now(), "event": event.value, "event_id": event.code, "event_type": event_type,
            "action": action.value, "outcome": outcome.value, "outcome_text": outcome.text,
            "reason": cut(reason, 500), "source": self.source, "who": dict(who),
            **({"peer": dict(peer)} if peer is not None else {}), "what": dict(what),
        }

    def _run(self) -> None:
        backoff = 0.5
        stopping = False
        while True:
            if not self._pending:
                try:
                    item = self._queue.get(timeout=1.0)
                except queue.Empty:
                    if stopping or self._stop.is_set() and self._queue.empty():
                        return
                    continue
                batch = [item]
                while len(batch) < _BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = stopping or any(event is None for event in batch)
                self._pending = [event for event in batch if event is not None]
                self._note_drops()
            if self._pending:
                try:
                    self._write(self._pending)
                except OSError as exc:
                    self._failed(exc)
                    if self._stop.wait(backoff):
                        return  # stopping: what could not be written is lost, and was logged
                    backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                    continue
                if self._syslog is not None:
                    self._syslog.send(self._pending)
                self._pending = []
                backoff = 0.5
                self._recovered()
            if stopping and self._queue.empty():
                return

    def _note_drops(self) -> None:
        """After events were dropped: an event that says how many (when the queue has room again)."""
        with self._lock:
            lost, self._dropped_unreported = self._dropped_unreported, 0
        if lost:
            self._pending.append(self._event(
                Event.SECURITY_ALERT, Action.EXECUTE, Outcome.SERIOUS_FAILURE, event_type="Audit Recording Stopped",
                who=self._node(), what={"dropped": lost}, reason=f"{lost} audit event(s) dropped: the queue was full"))

    def _write(self, events: list[dict[str, Any]]) -> None:
        handle = self._open()
        data = "".join(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n" for event in events)
        try:
            handle.write(data)
            handle.flush()
        except OSError:
            self._discard_handle()  # the buffer holds a partial line; the next try reopens and writes whole lines
            raise
        try:
            os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):  # not a file that syncs (a device)
                self._discard_handle()
                raise

    def _open(self):
        """The audit file, opened again when it was moved away or removed (rotation)."""
        assert self.path is not None
        try:
            stat = os.stat(self.path)
            current = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            current = None
        if self._file is not None and current == self._inode:
            return self._file
        self._discard_handle()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        stat = os.fstat(self._file.fileno())
        self._inode = (stat.st_dev, stat.st_ino)
        return self._file

    def _discard_handle(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None
        self._inode = None

    def _failed(self, exc: OSError) -> None:
        message = exc.strerror or str(exc)
        with self._lock:
            first = self._write_error is None
            self._write_error = message
        if first:
            log.error("audit: cannot write %s (%s); %d event(s) held, C-STOREs go on; /readyz fails (audit)",
                      self.path, message, len(self._pending))

    def _recovered(self) -> None:
        with self._lock:
            was, self._write_error = self._write_error, None
        if was is not None:
            log.warning("audit: writing %s again", self.path)


class _SyslogSink:
    """RFC 5424 messages over UDP (RFC 5426): one datagram per event, or per part of an
    event whose SOP instance UIDs do not fit in ``SYSLOG_MAX_BYTES``."""

    def __init__(self, settings: SyslogSettings, hostname: str) -> None:
        self.settings = settings
        self.hostname = hostname
        self.where = f"{settings.host}:{settings.port}"
        self.error: str | None = None
        self._socket: socket.socket | None = None

    def send(self, events: Iterable[dict[str, Any]]) -> None:
        try:
            if self._socket is None:
                family, kind, proto, _, address = socket.getaddrinfo(
                    self.settings.host, self.settings.port, type=socket.SOCK_DGRAM)[0]
                self._socket = socket.socket(family, kind, proto)
                self._socket.connect(address)
            for event in events:
                for message in rfc5424(event, facility=self.settings.facility, hostname=self.hostname,
                                       app_name=self.settings.app_name):
                    self._socket.send(message)
        except OSError as exc:
            if self.error is None:
                log.error("audit: cannot send to syslog %s (%s)", self.where, exc.strerror or exc)
            self.error = exc.strerror or str(exc)
            self.close()
            return
        self.error = None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def rfc5424(event: Mapping[str, Any], *, facility: int, hostname: str, app_name: str,
            limit: int = SYSLOG_MAX_BYTES) -> list[bytes]:
    """``event`` as RFC 5424 messages: ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID - JSON``,
    severity notice for a success and warning for a failure, MSGID the event's code; in
    several parts (``what.part``, ``what.parts``) when its SOP instance UIDs do not fit."""
    severity = 5 if event.get("outcome") == 0 else 4
    header = (f"<{facility * 8 + severity}>1 {event['time']} {hostname or '-'} {app_name} {os.getpid()}"
              f" {event.get('event_id') or '-'} - ").encode("ascii", "replace")

    def encoded(part: Mapping[str, Any]) -> bytes:
        return header + json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    whole = encoded(event)
    sops = list(event.get("what", {}).get("sop_instance_uids") or [])
    if len(whole) <= limit or not sops:
        return [whole]
    room = max(limit - (len(whole) - sum(len(s) + 3 for s in sops)) - 64, 65)
    chunks: list[list[str]] = [[]]
    size = 0
    for sop in sops:
        if chunks[-1] and size + len(sop) + 3 > room:
            chunks.append([])
            size = 0
        chunks[-1].append(sop)
        size += len(sop) + 3
    return [encoded({**event, "what": {**event["what"], "sop_instance_uids": chunk, "part": n, "parts": len(chunks)}})
            for n, chunk in enumerate(chunks, 1)]
