"""Retention: what a node may delete, when, and only that.

Only the files of ended jobs go, a series at a time: its received instances and the
result objects of its jobs, once the series is not receiving and none of its jobs is
open (``received``, ``processing``, ``sending``). Job rows stay, marked purged, as the
audit trail; instance rows go with their files.

By period: every job of the series that decides has a period by its outcome
(``retention.days`` for ``sent``, ``skipped_days`` for ``skipped`` and ``no_result``,
``failed_days`` for ``failed``; 0 keeps it), counted from when it ended; the series goes
when the last of them has passed. A superseded job and a job processed again
(``reprocess``) do not decide: their files go with the job that replaced them.

By pressure: while the spool's disk has less free space than
``retention.pressure_free_bytes``, the series whose jobs ended first go first, whatever
their periods, until there is that much again or no ended series is left.

Against the C-STORE handler, which writes an instance's file and then records its row:
the decision is taken from a snapshot (``StateStore.ended_series``) and checked again
inside the one transaction that deletes (``StateStore.purge_series``), which every row
write waits for. An instance recorded before that transaction reopens the series, which
is then left alone; one recorded after it finds no row and is recorded as new (its
series reopens, a new job follows). Only the files of the rows known inside the
transaction are deleted, never a folder as a whole (it goes only when empty), so a new
instance whose file is written but not yet recorded stays. A known instance that is
being received again (its file written again, its row not yet) has a file newer than
its row: the file is moved aside, found newer and put back.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from prometheus_client import Counter

from dicom_node.audit import Audit
from dicom_node.config import RetentionSettings
from dicom_node.store.spool import Spool
from dicom_node.store.state import EndedSeries, Job, JobState, StateStore, StoredInstance

__all__ = ["Reason", "Candidate", "Deletion", "Retention", "period_days"]

log = logging.getLogger(__name__)

_DAY = 86400.0


class Reason(str, Enum):
    """Why retention deleted a series (the metric's label)."""

    PERIOD = "period"
    PRESSURE = "pressure"


def period_days(settings: RetentionSettings, state: JobState) -> float:
    """The retention period of a job that ended in ``state``, in days (0: kept)."""
    if state is JobState.SENT:
        return settings.days
    if state in (JobState.SKIPPED, JobState.NO_RESULT):
        return settings.skipped_days
    if state in (JobState.FAILED, JobState.REJECTED, JobState.EXPIRED):  # a person may want to look, as at a failure
        return settings.failed_days
    raise ValueError(f"a {state.value} job has no retention period of its own")


@dataclass(frozen=True)
class Candidate:
    """An ended series, and when retention may delete its files."""

    seen: EndedSeries
    ended_at: float  # when the last of its jobs ended: the order under disk pressure
    due_at: float | None  # when its periods have all passed (None: kept until disk pressure)

    @property
    def jobs(self) -> tuple[Job, ...]:
        return self.seen.jobs

    @property
    def series_instance_uid(self) -> str:
        return self.seen.series.series_instance_uid

    def due(self, now: float) -> bool:
        return self.due_at is not None and self.due_at <= now

    @classmethod
    def of(cls, seen: EndedSeries, settings: RetentionSettings) -> Candidate:
        replaced = {job.reprocess_of for job in seen.jobs if job.reprocess_of is not None}
        deciding = [job for job in seen.jobs if job.state is not JobState.SUPERSEDED and job.id not in replaced]
        ended_at = max(job.updated_at for job in seen.jobs)
        if not deciding:  # what replaced them is gone already
            return cls(seen, ended_at, ended_at)
        periods = [period_days(settings, job.state) for job in deciding]
        if not all(periods):
            return cls(seen, ended_at, None)
        return cls(seen, ended_at, max(job.updated_at + days * _DAY for job, days in zip(deciding, periods)))


@dataclass(frozen=True)
class Deletion:
    """A series retention deleted, with its jobs' results."""

    candidate: Candidate
    reason: Reason
    files: int  # instance files deleted
    bytes: int  # what the instance files and results took


class Retention:
    """One node's retention over its state store and spool. ``free_bytes`` (the spool's
    free space) can be given, for tests; ``deletions`` counts each deleted series by
    reason."""

    def __init__(self, state: StateStore, spool: Spool, settings: RetentionSettings, min_free_bytes: int, *,
                 deletions: Counter | None = None, free_bytes: Callable[[], int] | None = None,
                 audit: Audit | None = None) -> None:
        self.state = state
        self.audit = audit or Audit.off()
        self.spool = spool
        self.settings = settings
        self.pressure_free_bytes = settings.pressure_bytes(min_free_bytes)
        self.deletions = deletions
        self.free_bytes = free_bytes or (lambda: shutil.disk_usage(spool.root).free)
        self._under_pressure = False

    def candidates(self) -> list[Candidate]:
        """Every ended series not deleted yet, the first ended first."""
        found = [Candidate.of(seen, self.settings) for seen in self.state.ended_series()]
        return sorted(found, key=lambda candidate: (candidate.ended_at, candidate.series_instance_uid))

    def plan(self, now: float | None = None) -> list[tuple[Candidate, Reason]]:
        """What ``run`` would delete now (``cleanup --dry-run``); under disk pressure as
        far as the files' sizes say it would free."""
        now = time.time() if now is None else now
        candidates = self.candidates()
        planned = [(candidate, Reason.PERIOD) for candidate in candidates if candidate.due(now)]
        if self.pressure_free_bytes:
            free = self.free_bytes()
            for candidate in (c for c in candidates if not c.due(now)):
                if free >= self.pressure_free_bytes:
                    break
                free += sum(_size(path) for path in self.paths(candidate))
                planned.append((candidate, Reason.PRESSURE))
        return planned

    def run(self, now: float | None = None) -> list[Deletion]:
        """Delete the series whose periods have passed, then, while the spool's disk is
        below ``retention.pressure_free_bytes``, the first ended ones."""
        now = time.time() if now is None else now
        candidates = self.candidates()
        done = [self.delete(candidate, Reason.PERIOD) for candidate in candidates if candidate.due(now)]
        if self.pressure_free_bytes:
            for candidate in (c for c in candidates if not c.due(now)):
                if self.free_bytes() >= self.pressure_free_bytes:
                    break
                done.append(self.delete(candidate, Reason.PRESSURE))
            self._report_pressure()
        return [deletion for deletion in done if deletion is not None]

    def _report_pressure(self) -> None:
        """A warning when the disk stays below the mark with nothing ended left, once until it recovers."""
        free = self.free_bytes()
        under = free < self.pressure_free_bytes
        if under and not self._under_pressure:
            log.warning("retention: %d bytes free in the spool, below retention.pressure_free_bytes %d, and no"
                        " ended series left to delete", free, self.pressure_free_bytes)
        self._under_pressure = under

    def paths(self, candidate: Candidate) -> list[Path]:
        """The folders of a candidate's files that exist: its series and each job's results."""
        folders = [candidate.seen.series.folder, *(self.spool.result_folder(job.id) for job in candidate.jobs)]
        return [folder for folder in folders if folder.exists()]

    def delete(self, candidate: Candidate, reason: Reason) -> Deletion | None:
        """Delete one series (its instance files known now and its jobs' results), if it is
        still as seen; None when it changed since (left for the next run)."""
        counted = {"files": 0, "bytes": 0, "kept": 0}
        deleted: list[str] = []  # SOP instance UIDs, for the audit

        def remove(instances: list[StoredInstance]) -> None:
            for instance in instances:
                size = _remove_unless_newer(instance)
                if size is None:
                    counted["kept"] += 1
                else:
                    counted["files"] += 1
                    counted["bytes"] += size
                    deleted.append(instance.sop_instance_uid)
            self._remove_if_empty(candidate.seen.series.folder)
            for job in candidate.jobs:
                folder = self.spool.result_folder(job.id)
                counted["bytes"] += _size(folder)
                shutil.rmtree(folder, ignore_errors=True)

        jobs = ", ".join(f"{job.id} {job.state.value}" for job in candidate.jobs)
        if not self.state.purge_series(candidate.seen, remove):
            log.info("retention: series %s (jobs %s) changed since it was chosen; left for the next run",
                     candidate.series_instance_uid, jobs)
            return None
        if self.deletions is not None:
            self.deletions.labels(reason=reason.value).inc()
        self.audit.record_deleted(study=candidate.seen.series.study_instance_uid,
                                  series=candidate.series_instance_uid, sops=deleted,
                                  jobs=[job.id for job in candidate.jobs], reason=f"retention ({reason.value})")
        log.info("retention (%s): deleted series %s, jobs %s: %d instance file(s) and the jobs' results, %d bytes%s",
                 reason.value, candidate.series_instance_uid, jobs, counted["files"], counted["bytes"],
                 f"; {counted['kept']} file(s) being received again kept" if counted["kept"] else "")
        return Deletion(candidate, reason, counted["files"], counted["bytes"])

    def _remove_if_empty(self, folder: Path) -> None:
        """The series folder, and its study folder, when nothing is left in them."""
        for path in (folder, folder.parent):
            if path == self.spool.incoming or self.spool.incoming not in path.parents:
                return
            try:
                path.rmdir()
            except OSError:  # not empty (a file that arrived since), or gone
                return


def _remove_unless_newer(instance: StoredInstance) -> int | None:
    """Delete an instance's file unless it was written after its row (it is being
    received again: its row follows); its size, or None when it was kept. The file is
    moved aside before it is looked at, so that a copy renamed into place meanwhile is
    never the one deleted."""
    aside = instance.path.with_name(f".{instance.path.name}.purging")
    try:
        os.rename(instance.path, aside)
    except FileNotFoundError:
        return 0
    stat = os.stat(aside)
    if stat.st_mtime <= instance.received_at:
        os.unlink(aside)
        return stat.st_size
    try:
        os.link(aside, instance.path)  # back in place, unless a newer copy arrived meanwhile
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        os.rename(aside, instance.path)
        return None
    os.unlink(aside)
    return None


def _size(path: Path) -> int:
    """Bytes in the files under ``path`` (or of ``path``), as far as they are still there."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total
