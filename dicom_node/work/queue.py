"""The hand-off from a completed series to processing and sending.

``JobQueue`` is the one interface between completion and the work; ``InProcessQueue``
keeps the queue in the SQLite state store, which the node owns, and runs it on threads
of the node's process:

* ``processing_slots`` processing threads each claim the oldest ``received`` job (one
  transaction, so no two take the same job) and run ``Processor.process``: the pipeline
  up to a SEG saved in the spool. Where the model runs is the ``ModelService`` behind
  the processor's segmenter: the embedded warm runner (one slot), or GPU workers over
  Celery (``workers.max_in_flight`` slots, several series at once).
* one send thread per destination runs ``Processor.send`` for each of that destination's
  outbox rows whose attempt is due, on its own schedule: a send never waits behind a
  segmentation, and a destination that is slow or down never holds up another.

A restart finds every job where it was (``StateStore.resume_interrupted``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol, TypeVar

from dicom_node.store.state import JobState, JobUpdate, StateStore
from dicom_node.work.processor import Processor

__all__ = ["JobQueue", "InProcessQueue"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 30.0  # seconds between tries while the state store fails

T = TypeVar("T")


class JobQueue(Protocol):
    def submit(self, job_id: int) -> None:
        """A job is ready (its series completed, or it was queued again)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0, interrupt: Callable[[], None] | None = None) -> None: ...


class InProcessQueue:
    """Processing threads and a send thread per destination over the state store."""

    def __init__(self, state: StateStore, processor: Processor, *, processing_slots: int = 1,
                 destinations: tuple[str, ...] = (), poll_seconds: float = 5.0) -> None:
        self.state = state
        self.processor = processor
        self.poll_seconds = poll_seconds
        self._work = threading.Event()  # a job may be waiting to be processed
        self._sends = {name: threading.Event() for name in destinations}  # a send to it may be due
        self._stop = threading.Event()
        self._processors = [
            threading.Thread(target=self._process_loop, name=f"processing-{n + 1}", daemon=True)
            for n in range(processing_slots)
        ]
        self._senders = [
            threading.Thread(target=self._send_loop, args=(name,), name=f"sender-{name}", daemon=True)
            for name in destinations
        ]

    def submit(self, job_id: int) -> None:
        self._work.set()
        self._wake_senders()

    def _wake_senders(self) -> None:
        for event in self._sends.values():
            event.set()

    def start(self) -> None:
        for thread in (*self._processors, *self._senders):
            thread.start()

    def stop(self, timeout: float = 30.0, interrupt: Callable[[], None] | None = None) -> None:
        """Take no new job; the jobs in hand get until ``timeout`` to end. A few seconds
        before it, ``interrupt`` (stopping the model) hands a job still running back."""
        self._stop.set()
        self.processor.stopping.set()
        self._work.set()
        self._wake_senders()
        deadline = time.monotonic() + timeout
        soft = deadline - min(3.0, timeout / 2)
        for thread in self._threads():
            thread.join(max(0.0, soft - time.monotonic()))
        if interrupt is not None and self._threads():
            interrupt()
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _threads(self) -> list[threading.Thread]:
        return [thread for thread in (*self._processors, *self._senders) if thread.is_alive()]

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in (*self._processors, *self._senders))

    def processing_problem(self) -> str | None:
        """The processing slot threads that have ended (for ``/healthz``); None when all run."""
        dead = [thread.name for thread in self._processors if not thread.is_alive()]
        return f"processing thread(s) not running: {', '.join(dead)}" if dead else None

    def sender_problem(self, destination: str) -> str | None:
        """Why the send thread of ``destination`` does not run (for ``/healthz``), or None."""
        name = f"sender-{destination}"
        if any(thread.name == name and thread.is_alive() for thread in self._senders):
            return None
        return f"the send thread of destination {destination} is not running"

    @property
    def stopped(self) -> bool:
        """True once every thread has ended (after ``stop``)."""
        return not self._threads()

    def _claim(self, claim: Callable[[], T | None]) -> T | None:
        try:
            return claim()
        except Exception:
            log.exception("cannot read the job queue")
            return None

    def _process_loop(self) -> None:
        while not self._stop.is_set():
            job = self._claim(self.state.claim_next_processing)
            if job is None:
                self._work.wait(self.poll_seconds)
                self._work.clear()
                continue
            self._work.set()  # another slot may take the next one
            try:
                self.processor.process(job)  # records its own failures; this is the last guard
            except Exception:
                log.exception("job %d: the processor could not record its outcome", job.id)
                self._hand_back(job.id)
            self._wake_senders()

    def _hand_back(self, job_id: int) -> None:
        """A job whose outcome could not be recorded (the state store failed) goes back to
        ``received`` once the store works again, with back-off, so that it runs again
        without a restart (its objects come out under the same UIDs)."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.state.update_job(job_id, JobState.RECEIVED,
                                      JobUpdate(reason="handed back: its outcome could not be recorded"),
                                      expect=JobState.PROCESSING)
                return
            except Exception as exc:
                log.error("job %d: cannot hand it back yet (%s); trying again in %.1fs", job_id, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    def _send_loop(self, destination: str) -> None:
        wake = self._sends[destination]
        backoff = 0.0  # after a failure of the state store: never a tight loop of sends
        while not self._stop.is_set():
            item = self._claim(lambda: self.state.claim_next_send(destination=destination))
            if item is not None:
                try:
                    self.processor.send(item)
                    backoff = 0.0
                except Exception:
                    log.exception("job %d: the processor could not record its send to %s", item.job_id, destination)
                    backoff = min(max(backoff * 2, 0.5), _MAX_BACKOFF)
                    self._stop.wait(backoff)
                continue
            try:
                due = self.state.next_wakeup(destination)
            except Exception:
                log.exception("cannot read the job queue")
                due = None
            wait = self.poll_seconds if due is None else max(0.05, min(self.poll_seconds, due - time.time()))
            wake.wait(wait)
            wake.clear()
