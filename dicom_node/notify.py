"""Webhook notifications (``notify:``): a job that failed, one whose results wait for a
reviewer, and optionally one whose results were all sent.

Each notice is one HTTP POST of a JSON object to each webhook that asked for its event::

    {"event": "job_failed" | "job_review" | "job_sent", "notice_id": "<32 hex>", "job_id": 12,
     "state": "failed", "reason": "...", "study_instance_uid": "...", "series_instance_uid": "...",
     "destinations": ["pacs"], "at": "2026-12-03T08:00:00.000000Z", "node": "DICOMNODE"}

UIDs, the job's state and its reason only: never a patient's name, ID or birth date (the
reason has been through the job's patient mask, ``pipeline.masking``, by the processor).
``destinations``: the destinations whose objects failed, wait for review or were sent.

Headers: ``X-Dicom-Node-Event`` (the event), ``X-Dicom-Node-Notice`` (the notice's id,
the same on every attempt: a receiver drops one it has seen), ``X-Dicom-Node-Timestamp``
(Unix seconds when this attempt was made) and ``X-Dicom-Node-Signature``:
``sha256=`` and the hex HMAC-SHA256, under the webhook's key, of the timestamp's ASCII
digits, one ``.``, and the body's bytes exactly as sent (``sign``). A receiver computes
the same over what it received, compares in constant time and refuses a timestamp far
from its clock (a replay).

Sending never blocks the caller: ``notify`` puts the notice on the webhook's bounded
queue and returns; one thread sends, oldest first per webhook. A receiver that is down,
does not answer within ``timeout_seconds`` or answers 5xx, 408 or 429 gets the notice
again after 1, 2, 4 ... seconds (at most 5 minutes apart), the notices behind it waiting,
until ``retry_seconds`` after the notice was made; then it is given up. Any other answer
(a 4xx, a redirect) ends the notice at once. Each outcome is logged and counted
(``dicom_node_notices{webhook,outcome}``: delivered, failed, dropped;
``dicom_node_notice_attempt_failures``; ``dicom_node_notices_waiting``). A full queue
drops the new notice (counted, logged once per streak). Notices are held in memory only:
a node that stops delivers what it can within a few seconds and logs what it leaves.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import requests

from dicom_node.config import NotifyEvent, Webhook, without_credentials
from dicom_node.metrics import Metrics
from dicom_node.store.state import JobState
from pipeline.masking import cut

__all__ = ["Notifier", "sign", "EVENT_OF_STATE", "EVENT_HEADER", "NOTICE_HEADER", "TIMESTAMP_HEADER",
           "SIGNATURE_HEADER"]

log = logging.getLogger(__name__)

EVENT_OF_STATE = {JobState.FAILED: NotifyEvent.FAILED, JobState.REVIEW: NotifyEvent.REVIEW,
                  JobState.SENT: NotifyEvent.SENT}
EVENT_HEADER = "X-Dicom-Node-Event"
NOTICE_HEADER = "X-Dicom-Node-Notice"
TIMESTAMP_HEADER = "X-Dicom-Node-Timestamp"
SIGNATURE_HEADER = "X-Dicom-Node-Signature"

_QUEUE_SIZE = 1000  # notices waiting per webhook; more are dropped
_FIRST_DELAY = 1.0
_MAX_DELAY = 300.0
_REASON_LIMIT = 1000


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Dicom-Node-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of
    ``timestamp`` (ASCII), ``.`` and ``body``."""
    return "sha256=" + hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class _Notice:
    id: str
    event: str  # job_failed, job_review, job_sent
    job_id: int
    body: bytes
    made: float  # time.monotonic()


@dataclass
class _Hook:
    """One webhook's key, connection and queue; ``due``: when its oldest notice is tried next."""

    settings: Webhook
    key: bytes
    session: requests.Session = field(default_factory=requests.Session)
    waiting: collections.deque[_Notice] = field(default_factory=collections.deque)
    due: float = 0.0
    delay: float = _FIRST_DELAY
    dropping: bool = False

    @property
    def verify(self) -> bool | str:
        return str(self.settings.ca_certificates) if self.settings.ca_certificates else self.settings.verify_tls

    @property
    def where(self) -> str:
        return f"{self.settings.name} ({without_credentials(self.settings.url)})"


class Notifier:
    """The node's webhooks; ``Notifier.off()`` has none. ``start`` runs the sender thread,
    ``close`` delivers what it can and stops it. ``notify`` returns at once."""

    def __init__(self, webhooks: Sequence[Webhook], *, ae_title: str, metrics: Metrics | None = None) -> None:
        """Reads each webhook's key now (``ConfigError`` naming it when it cannot be read)."""
        self.ae_title = ae_title
        self.metrics = metrics
        self._hooks = [_Hook(webhook, webhook.key()) for webhook in webhooks]
        self._events = {event for hook in self._hooks for event in hook.settings.events}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._drain_until = 0.0
        # totals since start, for tests and logs
        self.attempts = 0
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    @classmethod
    def off(cls) -> "Notifier":
        return cls((), ae_title="-")

    def wants(self, state: JobState) -> bool:
        """Whether some webhook is told when a job reaches ``state``."""
        event = EVENT_OF_STATE.get(state)
        return event is not None and event in self._events

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(hook.waiting) for hook in self._hooks)

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self._closing

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if not self._hooks or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()
        log.info("notify: webhook(s) %s", ", ".join(
            f"{hook.where} for {'/'.join(e.value for e in hook.settings.events)}" for hook in self._hooks))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what waits within ``timeout`` seconds, then stop; what is left is logged."""
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._drain_until = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + max(hook.settings.timeout_seconds for hook in self._hooks) + 1)
        self._thread = None
        left = self.waiting
        if left:
            log.warning("notify: %d notice(s) not delivered when the node stopped; they are not kept", left)
        for hook in self._hooks:
            hook.session.close()

    # -- the notices --------------------------------------------------------------------
    def notify(self, *, job_id: int, state: JobState, reason: str | None, study: str | None, series: str | None,
               destinations: Sequence[str] = ()) -> None:
        """Queue the notice of a job that reached ``state`` for every webhook that asked for
        it. ``reason`` must have been masked already (it is only shortened here)."""
        event = EVENT_OF_STATE.get(state)
        hooks = [hook for hook in self._hooks if event in hook.settings.events]
        if not hooks:
            return
        notice_id = uuid.uuid4().hex
        name = f"job_{event.value}"  # type: ignore[union-attr]
        body = json.dumps({
            "event": name, "notice_id": notice_id, "job_id": job_id, "state": state.value,
            "reason": cut(reason, _REASON_LIMIT), "study_instance_uid": study, "series_instance_uid": series,
            "destinations": sorted(set(destinations)), "at": _now(), "node": self.ae_title,
        }, separators=(",", ":")).encode("ascii")
        notice = _Notice(notice_id, name, job_id, body, time.monotonic())
        with self._cond:
            for hook in hooks:
                if len(hook.waiting) >= _QUEUE_SIZE:
                    self.dropped += 1
                    self._count(hook, "dropped")
                    if not hook.dropping:
                        log.error("notify %s: %d notices wait already; new notices are dropped until it drains"
                                  " (job %d's %s is the first)", hook.where, _QUEUE_SIZE, job_id, name)
                    hook.dropping = True
                    continue
                hook.dropping = False
                if not hook.waiting:
                    hook.due = notice.made
                hook.waiting.append(notice)
                self._waiting_changed(hook)
            self._cond.notify_all()

    def _count(self, hook: _Hook, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.notices.labels(hook.settings.name, outcome).inc()

    def _waiting_changed(self, hook: _Hook) -> None:
        if self.metrics is not None:
            self.metrics.notices_waiting.labels(hook.settings.name).set(len(hook.waiting))

    # -- the sender thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    busy = [hook for hook in self._hooks if hook.waiting]
                    if self._closing and (not busy or now >= self._drain_until):
                        return
                    due = [hook for hook in busy if hook.due <= now]
                    if due:
                        break
                    wake = min((hook.due for hook in busy), default=None)
                    if self._closing:
                        wake = self._drain_until if wake is None else min(wake, self._drain_until)
                    self._cond.wait(None if wake is None else max(wake - now, 0.01))
                work = [(hook, hook.waiting[0]) for hook in due]
            for hook, notice in work:
                self._attempt(hook, notice)

    def _attempt(self, hook: _Hook, notice: _Notice) -> None:
        """One POST of the oldest notice of ``hook``; the notice leaves its queue when it was
        taken, refused for good, or its ``retry_seconds`` are over."""
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "dicom-node", EVENT_HEADER: notice.event,
                   NOTICE_HEADER: notice.id, TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: sign(hook.key, timestamp, notice.body)}
        settings = hook.settings
        try:
            response = hook.session.post(settings.url, data=notice.body, headers=headers,
                                         timeout=settings.timeout_seconds, verify=hook.verify,
                                         allow_redirects=False, stream=True)  # its body is never read
            status = response.status_code
            response.close()
            error = None if 200 <= status < 300 else f"HTTP {status} {response.reason or ''}".rstrip()
            permanent = error is not None and status < 500 and status not in (408, 429)
        except requests.RequestException as exc:
            error, permanent = _failure(exc), False
        except Exception as exc:  # the notice's boundary: this one fails, the thread goes on with the next
            log.exception("notify %s: unexpected error sending notice %s", hook.where, notice.id)
            error, permanent = f"internal error: {type(exc).__name__}", True
        what = f"notify {hook.where}: notice {notice.id} ({notice.event}, job {notice.job_id})"
        with self._cond:
            self.attempts += 1
            now = time.monotonic()
            if error is None:
                outcome = "delivered"
                self.delivered += 1
                log.info("%s delivered", what)
            else:
                if self.metrics is not None:
                    self.metrics.notice_attempt_failures.labels(settings.name).inc()
                deadline = notice.made + settings.retry_seconds
                if not permanent and now < deadline:
                    hook.due = min(now + hook.delay, deadline)
                    log.warning("%s not delivered (%s); trying again in %.0fs", what, error, hook.due - now)
                    hook.delay = min(hook.delay * 2, _MAX_DELAY)
                    self._cond.notify_all()
                    return
                outcome = "failed"
                self.failed += 1
                log.error("%s %s (%s)", what, "refused, not tried again" if permanent
                          else f"given up after retry_seconds {settings.retry_seconds:g}", error)
            hook.waiting.popleft()
            hook.delay = _FIRST_DELAY
            hook.due = now
            self._count(hook, outcome)
            self._waiting_changed(hook)
            self._cond.notify_all()


def _failure(exc: requests.RequestException) -> str:
    """A request's failure in a few words: connection refused, a timeout, a TLS error."""
    if isinstance(exc, requests.exceptions.SSLError):
        kind = "TLS error"
    elif isinstance(exc, requests.exceptions.Timeout):
        kind = "no answer in time"
    elif isinstance(exc, requests.exceptions.ConnectionError):
        kind = "cannot connect"
    else:
        kind = type(exc).__name__
    inner: BaseException = exc
    for _ in range(10):  # the innermost cause (a chain may loop)
        outer = inner.__cause__ or inner.__context__
        if outer is None:
            break
        inner = outer
    detail = str(getattr(inner, "reason", None) or inner)
    return cut(f"{kind}: {without_credentials(detail)}", 300) or kind
