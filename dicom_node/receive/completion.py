"""Series completion: when a received series is handed to the worker.

A series is complete when no instance of it has arrived for ``stable_seconds`` and it
is not known to lack instances. A series known not to be whole (``incompleteness``: the
node refused some of its instances and the sender has not stored them since, the
headers announce more slices than arrived, or its positions leave a gap) is never
processed as if it were: it waits ``incomplete_grace_seconds`` more for the sender's
retry (most PACS resend refused instances), then ends ``failed`` with a reason that says
what is missing and why; ``retry --reprocess --allow-partial`` processes it on purpose. When
an association that carried instances is released normally (``complete_on_release``),
the series it carried are checked early: such a series is complete at once if no other
open association is still sending to it and its instances are known to be the whole
series (``pipeline.input.wholeness``: a regular stack with the count its headers
announce, or multi-frame objects). A sender that releases after every instance, or
spreads a series over several associations, therefore never completes a part of it. An
aborted association triggers nothing early; its series complete by the timer, which
also wins over an open but idle association. A series that ``dicom-node pull`` is
retrieving is left to the pull (``store.pulls.held_series``), which completes it as soon
as its retrieve ended.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable, Iterable

from dicom_node.config import CompletionSettings
from dicom_node.store.pulls import held_series
from dicom_node.store.state import StateStore
from pipeline.input.wholeness import Placement, is_whole, known_missing

__all__ = ["Completion", "incompleteness"]

log = logging.getLogger(__name__)


class Completion:
    """Tracks open associations and completes series; runs its timer in a thread."""

    def __init__(self, settings: CompletionSettings, state: StateStore, on_job: Callable[[int], None],
                 on_incomplete: Callable[[int], None] | None = None) -> None:
        """``on_job``: a job to process was created; ``on_incomplete``: a series ended
        failed because it is not whole (the id of its failed job)."""
        self.settings = settings
        self.state = state
        self.on_job = on_job
        self.on_incomplete = on_incomplete or (lambda job_id: None)
        self._waiting: set[str] = set()  # series known not whole, waiting for the sender (logged once)
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
        held = held_series(self.state.db)  # a pull completes these itself once retrieved
        for series_uid, last_received in self.state.receiving_series():
            if series_uid in held:
                continue
            idle = now - last_received
            if idle >= self.settings.stable_seconds:
                missing = incompleteness(self.state, series_uid)
                if missing is not None:
                    self._end_incomplete(series_uid, missing, idle, now)
                    continue
                why = f"no instance for {self.settings.stable_seconds:g} s"
            elif series_uid in early and series_uid not in busy:
                wholeness = is_whole(Placement.from_json(p) for p in self.state.placements(series_uid))
                if not wholeness.whole or self.state.refusals(series_uid):
                    log.info("series %s: association released, not known whole (%s); waiting", series_uid,
                             wholeness.reason if not wholeness.whole else "instances were refused")
                    continue
                why = f"association released, whole: {wholeness.reason}"
            else:
                continue
            self._waiting.discard(series_uid)
            job_id = self.state.complete_series(series_uid, now=now)
            if job_id is not None:
                log.info("series %s complete (%s); job %d created", series_uid, why, job_id)
                jobs.append(job_id)
                self.on_job(job_id)
            else:
                log.info("series %s complete (%s); no new instance since its last job", series_uid, why)
        return jobs

    def _end_incomplete(self, series_uid: str, missing: str, idle: float, now: float) -> None:
        """Wait for the sender's retry, or end the series ``failed`` once the grace is over."""
        grace = self.settings.incomplete_grace_seconds
        if idle < self.settings.stable_seconds + grace:
            if series_uid not in self._waiting:
                self._waiting.add(series_uid)
                log.warning("series %s is not whole (%s); waiting up to %g s for the sender to send the rest",
                            series_uid, missing, grace)
            return
        self._waiting.discard(series_uid)
        reason = (f"the series is not whole: {missing}; nothing came for {grace:g} s more"
                  " (completion.incomplete_grace_seconds)")
        job_id = self.state.fail_incomplete_series(series_uid, reason, now=now)
        if job_id is not None:
            log.error("series %s: job %d failed: %s", series_uid, job_id, reason)
            self.on_incomplete(job_id)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        """The timer thread runs (between ``start`` and ``stop``), for ``/healthz``."""
        return self._thread.is_alive()

    def _run(self) -> None:
        interval = min(1.0, self.settings.stable_seconds / 4)
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # keep the timer alive; the next tick retries
                log.exception("series completion check failed")
            self._wake.wait(interval)
            self._wake.clear()


def incompleteness(state: StateStore, series_uid: str) -> str | None:
    """Why the series is known not to be whole, or None: instances the node refused and
    the sender has not stored since (with the status and reason most of them got), or
    what the received headers say is missing (``pipeline.input.wholeness.known_missing``)."""
    refused = state.refusals(series_uid)
    if refused:
        stored = state.instance_count(series_uid)
        (status, reason), _ = Counter((r.status, r.reason) for r in refused).most_common(1)[0]
        return (f"the node refused {len(refused)} of {stored + len(refused)} instances"
                f" (0x{status:04X}: {reason})")
    return known_missing(Placement.from_json(p) for p in state.placements(series_uid))
