"""Is a destination there? One C-ECHO (DIMSE, with its TLS) or one QIDO-RS query
(DICOMweb, ``GET {url}/studies?limit=1`` with its credentials), for ``dicom-node echo``
and for the node at start.

``echo`` makes one check and says how it went (``EchoResult``); it never raises for the
destination's sake. ``StartupEchoes`` checks every destination in a background thread
when the node starts (never holding up the start), logs each outcome, and checks again
with back-off (2 s, doubling, at most a minute) a destination that did not answer, until
it has answered once. Until then ``problem(name)`` says why, for ``/readyz``; a send to
the destination that went through counts as an answer too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dicom_node.config import Destination
from dicom_node.errors import SendError
from dicom_node.send import dicomweb, dimse

__all__ = ["EchoResult", "echo", "StartupEchoes"]

log = logging.getLogger(__name__)

_FIRST_RETRY_SECONDS = 2.0
_MAX_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class EchoResult:
    """How one check of one destination went: ``detail`` is what answered, or why not."""

    destination: str
    peer: str
    ok: bool
    detail: str
    seconds: float

    @property
    def line(self) -> str:
        outcome = "ok" if self.ok else "FAILED"
        return f"{self.destination} ({self.peer}): {outcome}: {self.detail} ({self.seconds:.2f} s)"


def echo(destination: Destination, *, calling_ae_title: str, timeout: float) -> EchoResult:
    """One C-ECHO, or one QIDO-RS query, to ``destination``."""
    started = time.monotonic()
    try:
        if destination.protocol == "dicomweb":
            status = dicomweb.query_studies(destination, timeout=timeout)
            detail = f"QIDO-RS answered HTTP {status}"
        else:
            dimse.echo(destination, calling_ae_title=calling_ae_title, timeout=timeout)
            detail = "C-ECHO answered success (0x0000)"
        ok = True
    except SendError as exc:
        ok, detail = False, str(exc)
    return EchoResult(destination.name, destination.peer, ok, detail, time.monotonic() - started)


class StartupEchoes:
    """Each destination checked at start, in a thread of its own, until it answered once.

    ``answered_by_send(name)``: whether a send to the destination went through (the state
    store's send log), which counts as an answer."""

    def __init__(self, destinations: Sequence[Destination], *, calling_ae_title: str, timeout: float,
                 answered_by_send: Callable[[str], bool]) -> None:
        self.destinations = tuple(destinations)
        self.calling_ae_title = calling_ae_title
        self.timeout = timeout
        self.answered_by_send = answered_by_send
        self._lock = threading.Lock()
        self._answered: set[str] = set()
        self._last: dict[str, EchoResult] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def problem(self, name: str) -> str | None:
        """Why ``name`` does not count as reachable yet, or None once it answered."""
        with self._lock:
            if name in self._answered:
                return None
            last = self._last.get(name)
        if self._sent(name):
            with self._lock:
                self._answered.add(name)
            return None
        if last is None:
            return "not checked yet (the C-ECHO or QIDO-RS at start is under way)"
        return f"has not answered since the node started; last check: {last.detail}"

    def _sent(self, name: str) -> bool:
        try:
            return self.answered_by_send(name)
        except Exception:  # the state store closing under a node that stops: check again later
            return False

    def _run(self) -> None:
        waiting = list(self.destinations)
        delay = _FIRST_RETRY_SECONDS
        while waiting and not self._stop.is_set():
            for destination in list(waiting):
                if self._stop.is_set():
                    return
                result = echo(destination, calling_ae_title=self.calling_ae_title, timeout=self.timeout)
                first = destination.name not in self._last
                with self._lock:
                    self._last[destination.name] = result
                    if result.ok:
                        self._answered.add(destination.name)
                if result.ok:
                    waiting.remove(destination)
                    log.info("destination %s%s", result.line, "" if first else " (after earlier checks failed)")
                elif self._sent(destination.name):
                    waiting.remove(destination)
                elif first:
                    log.warning("destination %s; checking again with back-off until it answers", result.line)
            if waiting:
                self._stop.wait(delay)
                delay = min(delay * 2, _MAX_RETRY_SECONDS)
