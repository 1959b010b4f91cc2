"""One pull from one source: query, decide per series, retrieve, complete.

``Puller.run`` queries the source (``pull.query``), decides each series from its
series-level attributes (``pull.decide``), records what it found in the state store
(``store.pulls``) and retrieves the series to be processed, at most
``sources[].max_concurrent`` at once and only inside ``sources[].window``. A series
whose retrieve ended is completed at once (``StateStore.complete_series``): its job is
made, and the running node's queue (which polls the state store) processes and sends it.
The pull is named by its source and filters: run again with the same arguments, it
retrieves only what it has not completed (a series interrupted halfway is retrieved
again; its instances are stored again under the same SOP UIDs, so no second job comes
of them). A series that some pull completed with the same configuration (models, rules,
pipeline, destinations) is not pulled again unless ``reprocess``.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

from dicom_node.audit import Audit
from dicom_node.config import Config, Source
from dicom_node.metrics import Metrics
from dicom_node.pull.common import PullError, PullFilter, SeriesFound
from dicom_node.pull.decide import Decision, config_digest, decide
from dicom_node.pull.query import find_series
from dicom_node.pull.retrieve import Retrieved, retrieve_series
from dicom_node.receive.intake import Intake
from dicom_node.store.pulls import PullLog, PullState
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, StateStore
from pipeline.masking import PatientMask

__all__ = ["PlannedSeries", "PullProgress", "Puller", "pull_progress", "pull_settled", "window_wait"]

log = logging.getLogger(__name__)

_PROCESSED = frozenset(state.value for state in JobState) - {
    JobState.RECEIVED.value, JobState.PROCESSING.value, JobState.SUPERSEDED.value}
_ENDED = frozenset({JobState.SENT.value, JobState.NO_RESULT.value, JobState.SKIPPED.value, JobState.FAILED.value,
                    JobState.REJECTED.value, JobState.EXPIRED.value})


@dataclass(frozen=True)
class PlannedSeries:
    """A series found, what the rules decided, and whether a pull already completed it
    with the same configuration."""

    series: SeriesFound
    decision: Decision
    pulled_before: bool

    def record(self) -> dict:
        """The series as ``--dry-run`` lists it (its description through the patient mask)."""
        mask = PatientMask.of(self.series.attributes)
        return {"study_instance_uid": self.series.study_instance_uid,
                "series_instance_uid": self.series.series_instance_uid,
                "study_date": self.series.study_date, "modality": self.series.modality,
                "series_description": mask(self.series.description) or "", "instances": self.series.instances,
                "retrieve": self.decision.retrieve and not self.pulled_before,
                "decision": ("already pulled with this configuration" if self.decision.retrieve and self.pulled_before
                             else self.decision.reason)}


@dataclass(frozen=True)
class PullProgress:
    """How far a pull got: series found, to retrieve, retrieved (completed), failed,
    processed and sent (their jobs, from the state store); ``paused_until``: "HH:MM"
    while outside the source's window."""

    found: int = 0
    to_retrieve: int = 0
    retrieved: int = 0
    failed: int = 0
    processed: int = 0
    sent: int = 0
    paused_until: str | None = None

    def record(self) -> dict:
        return {"found": self.found, "to_retrieve": self.to_retrieve, "retrieved": self.retrieved,
                "failed": self.failed, "processed": self.processed, "sent": self.sent,
                "paused_until": self.paused_until}


def window_wait(window: tuple[int, int] | None, now: datetime.datetime) -> tuple[float, str] | None:
    """Outside the window: the seconds until it opens and its start as "HH:MM"; None inside
    (or without a window). A window whose end is before its start passes midnight."""
    if window is None:
        return None
    start, end = window
    minute = now.hour * 60 + now.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return None
    opens = now.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
    if opens <= now:
        opens += datetime.timedelta(days=1)
    return (opens - now).total_seconds(), f"{start // 60:02d}:{start % 60:02d}"


class Puller:
    """Pulls from one source into the node's spool and state store."""

    def __init__(self, config: Config, source: Source, state: StateStore, spool: Spool, *,
                 metrics: Metrics | None = None, audit: Audit | None = None,
                 clock: Callable[[], datetime.datetime] = datetime.datetime.now) -> None:
        self.config = config
        self.source = source
        self.state = state
        self.pulls = PullLog(state.db)
        self.intake = Intake(config.storage, spool, state, metrics or Metrics())
        self.audit = audit or Audit.off()
        self.calling_ae_title = source.calling_ae_title or config.node.ae_title
        self.digest = config_digest(config)
        self.clock = clock
        self._lock = threading.Lock()
        self._paused_until: str | None = None

    # -- what would be pulled ---------------------------------------------------------
    def plan(self, filters: PullFilter) -> list[PlannedSeries]:
        """Query the source and decide every series; retrieves nothing (``--dry-run``)."""
        calling = self._calling_for_rules()
        planned = []
        for series in find_series(self.source, self.calling_ae_title, filters):
            decision = decide(self.config, series, calling)
            planned.append(PlannedSeries(series, decision,
                                         self.pulls.completed_before(series.series_instance_uid, self.digest)))
        return planned

    def _calling_for_rules(self) -> str:
        """The calling AE title the node will record for the series (rules can match it):
        the source's AE title, which C-MOVE's sub-operations also carry; a DICOMweb
        source's name."""
        return self.source.ae_title or self.source.name

    # -- the pull -----------------------------------------------------------------------
    def run(self, filters: PullFilter, *, reprocess: bool = False, started_by: str = "cli",
            stop: threading.Event | None = None,
            on_progress: Callable[[str, PullProgress], None] | None = None) -> PullProgress:
        """Pull: returns the progress at the end (stopped early when ``stop`` is set, the
        run then left to resume). ``on_progress(event, progress)`` after every change."""
        stop = stop or threading.Event()
        notify = on_progress or (lambda event, progress: None)
        key = filters.key(self.source.name)
        self.pulls.start_run(key, {"source": self.source.name, "reprocess": reprocess, **filters.arguments()},
                             started_by)
        try:
            planned = self.plan(filters)
        except PullError as exc:
            self.pulls.end_run(key, "failed", str(exc))
            raise
        retrieve = []
        for item in planned:
            wanted = item.decision.retrieve and (reprocess or not item.pulled_before)
            reason = item.decision.reason
            if item.decision.retrieve and not wanted:
                reason = "already pulled with this configuration"
            state = self.pulls.found(key, item.series.series_instance_uid, item.series.study_instance_uid,
                                     self.source.name, self.digest, PullState.FOUND if wanted else PullState.SKIPPED,
                                     reason)
            if state is PullState.COMPLETED and reprocess:
                self.pulls.set_state(key, item.series.series_instance_uid, PullState.FOUND, reason=reason)
                state = PullState.FOUND
            if state in (PullState.FOUND, PullState.RETRIEVING, PullState.FAILED):
                retrieve.append(item)
        log.info("pull %s from %s: %d series found, %d to retrieve", key, self.source.name, len(planned),
                 len(retrieve))
        notify("found", self.progress(key))
        with ThreadPoolExecutor(max_workers=self.source.max_concurrent, thread_name_prefix="pull") as pool:
            futures = [pool.submit(self._one, key, item, reprocess, stop, notify) for item in retrieve]
            for future in futures:
                future.result()
        progress = self.progress(key)
        if not stop.is_set():
            self.pulls.end_run(key, "ended" if not progress.failed else "failed",
                               None if not progress.failed else f"{progress.failed} series failed")
        notify("ended" if not stop.is_set() else "stopped", progress)
        return progress

    def _one(self, key: str, item: PlannedSeries, reprocess: bool, stop: threading.Event,
             notify: Callable[[str, PullProgress], None]) -> None:
        """Retrieve and complete one series (the boundary: its failure fails it only)."""
        series = item.series
        uid = series.series_instance_uid
        if not self._wait_for_window(stop, key, notify) or stop.is_set():
            return
        self.pulls.set_state(key, uid, PullState.RETRIEVING, reason=item.decision.reason)
        notify("retrieving", self.progress(key))
        started = time.monotonic()
        try:
            result = retrieve_series(self.source, series, intake=self.intake, calling_ae_title=self.calling_ae_title,
                                     move_destination=self.config.node.ae_title, stop=stop)
        except PullError as exc:
            if stop.is_set():
                log.info("pull %s: the retrieve of series %s was stopped; a pull run again retrieves it", key, uid)
                return
            log.error("pull %s: series %s: %s", key, uid, exc)
            self.pulls.set_state(key, uid, PullState.FAILED, reason=str(exc))
            notify("failed", self.progress(key))
            return
        except Exception as exc:  # the boundary of one series
            log.exception("pull %s: series %s failed", key, uid)
            self.pulls.set_state(key, uid, PullState.FAILED, reason=f"{type(exc).__name__}: {exc}")
            notify("failed", self.progress(key))
            return
        self._audit(series, result)
        if result.failed:
            reason = f"{result.failed} instance(s) not retrieved" + (f": {result.refused[-1][2]}" if result.refused
                                                                      else " (failed sub-operations)")
            log.error("pull %s: series %s: %s", key, uid, reason)
            # held from completion (never a job of part of a series) until a pull runs again
            self.pulls.set_state(key, uid, PullState.FAILED, reason=reason, instances=len(result.stored))
            notify("failed", self.progress(key))
            return
        job_id = self.state.complete_series(uid)
        if job_id is None and reprocess:
            job_id = self._reprocess(uid)
        count = self.state.instance_count(uid)
        self.pulls.set_state(key, uid, PullState.COMPLETED, reason=item.decision.reason, instances=count,
                             job_id=job_id)
        log.info("pull %s: series %s retrieved (%d instances, %.1f s)%s", key, uid, count,
                 time.monotonic() - started, f"; job {job_id}" if job_id is not None else "; no new instance")
        notify("retrieved", self.progress(key))

    def _reprocess(self, series_uid: str) -> int | None:
        """``--reprocess`` of a series whose instances the node had: its latest ended job again."""
        jobs = [job for job in self.state.jobs() if job.series.series_instance_uid == series_uid]
        if not jobs:
            return None
        latest = max(jobs, key=lambda job: job.id)
        if latest.state.value not in _ENDED:
            return None  # still open: it will be processed anyway
        return self.state.reprocess(latest.id).id

    def _audit(self, series: SeriesFound, result: Retrieved) -> None:
        if self.source.protocol == "dimse" and self.source.retrieve == "move":
            return  # the node's SCP received them and audited each association
        address = self.source.host or self.source.connection.peer
        self.audit.record_received(calling_ae=self._calling_for_rules(), address=address,
                                   study=series.study_instance_uid, series=series.series_instance_uid,
                                   received=result.stored, refused=result.refused)

    def _wait_for_window(self, stop: threading.Event, key: str,
                         notify: Callable[[str, PullProgress], None]) -> bool:
        """Wait until inside the source's window; False when stopped meanwhile."""
        window = self.source.window_minutes()
        logged = False
        while not stop.is_set():
            wait = window_wait(window, self.clock())
            if wait is None:
                with self._lock:
                    self._paused_until = None
                return True
            seconds, opens = wait
            with self._lock:
                self._paused_until = opens
            if not logged:
                log.info("pull %s: outside the window %s of source %s: paused until %s", key, self.source.window,
                         self.source.name, opens)
                notify("paused", self.progress(key))
                logged = True
            stop.wait(min(seconds, 30.0))
        return False

    # -- progress -----------------------------------------------------------------------
    def progress(self, key: str) -> PullProgress:
        with self._lock:
            paused = self._paused_until
        return replace(pull_progress(self.pulls, key), paused_until=paused)


def pull_progress(pulls: PullLog, key: str) -> PullProgress:
    """A pull's progress from the state store (also for the status page)."""
    rows = pulls.series(key)
    wanted = [row for row in rows if row.state is not PullState.SKIPPED]
    done = [row for row in wanted if row.state is PullState.COMPLETED]
    return PullProgress(
        found=len(rows), to_retrieve=len(wanted), retrieved=len(done),
        failed=sum(1 for row in wanted if row.state is PullState.FAILED),
        processed=sum(1 for row in done if row.job_state in _PROCESSED),
        sent=sum(1 for row in done if row.job_state == JobState.SENT.value),
    )



def pull_settled(pulls: PullLog, key: str) -> bool:
    """Every series the pull retrieved has a job that ended (sent, or nothing to send)."""
    return all(row.job_state in _ENDED for row in pulls.series(key) if row.state is PullState.COMPLETED)
