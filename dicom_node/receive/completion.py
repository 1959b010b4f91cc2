"""Series completion: when a received series is handed to the worker.

A series is complete when no instance of it has arrived for ``stable_seconds``. When
an association that carried instances is released normally (``complete_on_release``),
the series it carried are checked early: such a series is complete at once if no other
open association is still sending to it and its instances are known to be the whole
series (``pipeline.input.wholeness``: a regular stack with the count its headers
announce, or multi-frame objects). A sender that releases after every instance, or
spreads a series over several associations, therefore never completes a part of it. An
aborted association triggers nothing early; its series complete by the timer, which
also wins over an open but idle association.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable, Iterable

from dicom_node.config import CompletionSettings
from dicom_node.store.state import StateStore
from pipeline.input.wholeness import Placement, is_whole

__all__ = ["Completion"]

log = logging.getLogger(__name__)


class Completion:
    """Tracks open associations and completes series; runs its timer in a thread."""

    def __init__(self, settings: CompletionSettings, state: StateStore, on_job: Callable[[int], None]) -> None:
        self.settings = settings
        self.state = state
        self.on_job = on_job
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()  # series uid -> open associations carrying it
        self._early: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)

    # -- called from the SCP's handlers ---------------------------------------------
    def association_started(self, series_uids: Iterable[str]) -> None:
        with self._lock:
            self._open.update(series_uids)

    def association_ended(self, series_uids: Iterable[str], *, released: bool) -> None:
        with self._lock:
            for uid in series_uids:
                self._open[uid] -= 1
                if self._open[uid] <= 0:
                    del self._open[uid]
                    if released and self.settings.complete_on_release:
                        self._early.add(uid)
        self._wake.set()

    # -- the timer --------------------------------------------------------------------
    def check(self, now: float | None = None) -> list[int]:
        """Complete every due series; returns the ids of the jobs created."""
        now = time.time() if now is None else now
        with self._lock:
            early, self._early = self._early, set()
            busy = set(self._open)
        jobs = []
        for series_uid, last_received in self.state.receiving_series():
            if now - last_received >= self.settings.stable_seconds:
                why = f"no instance for {self.settings.stable_seconds:g} s"
            elif series_uid in early and series_uid not in busy:
                wholeness = is_whole(Placement.from_json(p) for p in self.state.placements(series_uid))
                if not wholeness.whole:
                    log.info("series %s: association released, not known whole (%s); waiting",
                             series_uid, wholeness.reason)
                    continue
                why = f"association released, whole: {wholeness.reason}"
            else:
                continue
            job_id = self.state.complete_series(series_uid, now=now)
            if job_id is not None:
                log.info("series %s complete (%s); job %d created", series_uid, why, job_id)
                jobs.append(job_id)
                self.on_job(job_id)
            else:
                log.info("series %s complete (%s); no new instance since its last job", series_uid, why)
        return jobs

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = min(1.0, self.settings.stable_seconds / 4)
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # keep the timer alive; the next tick retries
                log.exception("series completion check failed")
            self._wake.wait(interval)
            self._wake.clear()
