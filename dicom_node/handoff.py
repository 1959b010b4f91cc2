"""The hand-off from a completed series to processing and sending.

``JobQueue`` is the one interface between completion and the work; ``InProcessQueue``
keeps the queue in the SQLite state store, which the node owns, and runs it on threads
of the node's process:

* ``processing_slots`` processing threads each claim the oldest ``received`` job (one
  transaction, so no two take the same job) and run ``Worker.process``: the pipeline
  up to a SEG saved in the spool. Where the model runs is the ``ModelService`` behind
  the worker's segmenter: the embedded warm runner (one slot), or GPU workers over
  Celery (``workers.max_in_flight`` slots, several series at once).
* one send thread runs ``Worker.send`` for every ``sending`` job whose attempt is due,
  on its own schedule: a send never waits behind a segmentation.

A restart finds every job where it was (``StateStore.resume_interrupted``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from dicom_node.state import Job, StateStore
from dicom_node.worker import Worker

__all__ = ["JobQueue", "InProcessQueue"]

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    def submit(self, job_id: int) -> None:
        """A job is ready (its series completed, or it was queued again)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0, interrupt: Callable[[], None] | None = None) -> None: ...


class InProcessQueue:
    """Processing threads and one send thread over the jobs table of the state store."""

    def __init__(self, state: StateStore, worker: Worker, *, processing_slots: int = 1,
                 poll_seconds: float = 5.0) -> None:
        self.state = state
        self.worker = worker
        self.poll_seconds = poll_seconds
        self._work = threading.Event()  # a job may be waiting to be processed
        self._send = threading.Event()  # a send may be due
        self._stop = threading.Event()
        self._processors = [
            threading.Thread(target=self._process_loop, name=f"processing-{n + 1}", daemon=True)
            for n in range(processing_slots)
        ]
        self._sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)

    def submit(self, job_id: int) -> None:
        self._work.set()
        self._send.set()

    def start(self) -> None:
        for thread in (*self._processors, self._sender):
            thread.start()

    def stop(self, timeout: float = 30.0, interrupt: Callable[[], None] | None = None) -> None:
        """Take no new job; the jobs in hand get until ``timeout`` to end. A few seconds
        before it, ``interrupt`` (stopping the model) hands a job still running back."""
        self._stop.set()
        self._work.set()
        self._send.set()
        deadline = time.monotonic() + timeout
        soft = deadline - min(3.0, timeout / 2)
        for thread in self._threads():
            thread.join(max(0.0, soft - time.monotonic()))
        if interrupt is not None and self._threads():
            interrupt()
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _threads(self) -> list[threading.Thread]:
        return [thread for thread in (*self._processors, self._sender) if thread.is_alive()]

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in (*self._processors, self._sender))

    @property
    def stopped(self) -> bool:
        """True once every thread has ended (after ``stop``)."""
        return not self._threads()

    def _claim(self, claim: Callable[[], Job | None]) -> Job | None:
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
                self.worker.process(job)  # records its own failures; this is the last guard
            except Exception:
                log.exception("job %d: the worker could not record its outcome", job.id)
            self._send.set()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            job = self._claim(self.state.claim_next_send)
            if job is not None:
                try:
                    self.worker.send(job)
                except Exception:
                    log.exception("job %d: the worker could not record its outcome", job.id)
                continue
            try:
                due = self.state.next_wakeup()
            except Exception:
                log.exception("cannot read the job queue")
                due = None
            wait = self.poll_seconds if due is None else max(0.05, min(self.poll_seconds, due - time.time()))
            self._send.wait(wait)
            self._send.clear()
