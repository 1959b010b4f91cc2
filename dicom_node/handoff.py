"""The hand-off from a completed series to whatever processes it.

``JobQueue`` is the one interface between completion and processing. The embedded
default, ``InProcessQueue``, keeps the queue in the SQLite state store and runs one
worker thread in the node's process: jobs run one at a time in the order their series
completed, and a restart finds them where they were. A site that needs several GPU
workers implements the same three methods on an established task queue over Redis
(Huey or Celery): ``submit`` enqueues a task that calls ``Worker.run`` for the job on a
worker machine; nothing else in the node changes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from dicom_node.state import StateStore
from dicom_node.worker import Worker

__all__ = ["JobQueue", "InProcessQueue"]

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    def submit(self, job_id: int) -> None:
        """A job is ready (its series completed, or it was queued again)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class InProcessQueue:
    """One worker thread over the jobs table of the state store."""

    def __init__(self, state: StateStore, worker: Worker, poll_seconds: float = 5.0) -> None:
        self.state = state
        self.worker = worker
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def submit(self, job_id: int) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.state.claim_next_job()
            except Exception:
                log.exception("cannot read the job queue")
                job = None
            if job is not None:
                try:
                    self.worker.run(job)  # records its own failures; this is the last guard
                except Exception:
                    log.exception("job %d: the worker could not record its outcome", job.id)
                continue
            due = self.state.next_wakeup()
            wait = self.poll_seconds if due is None else max(0.05, min(self.poll_seconds, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()
