"""Retention: what a node may delete, and only that.

A received series and its result objects are deleted once their job has ended ``sent`` more than
``retention.days`` ago and no other job of the series is still open. Failed, skipped
and unfinished jobs are kept until they are retried or removed by hand. The job rows
stay (marked purged) as the audit trail.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.store.state import Job, StateStore

__all__ = ["Expired", "expired", "purge"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expired:
    job: Job
    paths: tuple[Path, ...]  # the series folder and the job's results folder, as far as they exist


def expired(state: StateStore, days: float, now: float | None = None) -> list[Expired]:
    """Jobs (with their files) that retention would delete now."""
    if days <= 0:
        return []
    now = time.time() if now is None else now
    found = []
    for job in state.purgeable_jobs(before=now - days * 86400):
        paths = [job.series.folder]
        if job.result_path is not None:  # results/<job id>/[<object>/]<file>: the job's whole folder
            paths.extend(folder for folder in job.result_path.parents if folder.name == str(job.id))
        found.append(Expired(job, tuple(p for p in paths if p.exists())))
    return found


def purge(state: StateStore, items: list[Expired]) -> int:
    for item in items:
        for path in item.paths:
            shutil.rmtree(path, ignore_errors=True)
        state.mark_purged(item.job.id)
        log.info("retention: deleted series %s and the results of job %d", item.job.series.series_instance_uid,
                 item.job.id)
    return len(items)
