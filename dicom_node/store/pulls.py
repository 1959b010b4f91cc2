"""What ``dicom-node pull`` found and how far it got, in the node's state store.

One row per pull and series (``pulls``): ``found``, ``skipped`` (the rules decided from
its series-level attributes, or it was pulled before with the same configuration),
``retrieving``, ``completed`` (retrieved, its series completed, its job made) or
``failed`` (retried when the pull runs again). A pull is named by its key (the source
and filters): run again with the same arguments it reads its rows and goes on where it
stopped. A series is ``retrieving`` from the first request until its series is
completed, and a ``failed`` one until a pull retrieved it whole: the node's completion
timer holds it (``held_series``), so that a pull interrupted halfway never gets a job
made of part of a series; the pull run again retrieves it again. ``pull_runs`` records
each pull as started (by the CLI or the status page) and whether it ended, so that the
node resumes a page-started pull after a restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dicom_node.store.db import Database

__all__ = ["PullState", "PulledSeries", "PullRun", "PullLog", "held_series"]


class PullState(str, Enum):
    FOUND = "found"
    SKIPPED = "skipped"
    RETRIEVING = "retrieving"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class PulledSeries:
    """A series' row of one pull, with the state of the newest job of its series."""

    series_instance_uid: str
    study_instance_uid: str
    state: PullState
    reason: str | None
    instances: int
    job_id: int | None
    config_digest: str
    job_state: str | None  # the newest job of the series (None: none yet)


@dataclass(frozen=True)
class PullRun:
    pull_key: str
    arguments: dict[str, Any]
    started_by: str
    state: str  # running, ended, failed
    reason: str | None
    started_at: float
    updated_at: float


class PullLog:
    """The ``pulls`` and ``pull_runs`` tables, over the state store's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- runs -------------------------------------------------------------------------
    def start_run(self, pull_key: str, arguments: dict[str, Any], started_by: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            db.execute(
                """INSERT INTO pull_runs (pull_key, arguments, started_by, state, started_at, updated_at)
                   VALUES (?, ?, ?, 'running', ?, ?)
                   ON CONFLICT(pull_key) DO UPDATE SET arguments = excluded.arguments,
                       started_by = excluded.started_by, state = 'running', reason = NULL,
                       updated_at = excluded.updated_at""",
                (pull_key, json.dumps(arguments, sort_keys=True), started_by, now, now),
            )

    def end_run(self, pull_key: str, state: str, reason: str | None = None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            db.execute("UPDATE pull_runs SET state = ?, reason = ?, updated_at = ? WHERE pull_key = ?",
                       (state, reason, now, pull_key))

    def runs(self, limit: int = 20) -> list[PullRun]:
        with self.db.lock:
            rows = self.db.connection.execute(
                "SELECT * FROM pull_runs ORDER BY updated_at DESC LIMIT ?", (limit,)).fetchall()
        return [PullRun(row["pull_key"], json.loads(row["arguments"]), row["started_by"], row["state"],
                        row["reason"], row["started_at"], row["updated_at"]) for row in rows]

    # -- series -----------------------------------------------------------------------
    def found(self, pull_key: str, series_uid: str, study_uid: str, source: str, digest: str,
              state: PullState, reason: str | None, now: float | None = None) -> PullState:
        """Record a series the query found, with what the pull decided (``found`` or
        ``skipped``); a row already ``completed`` with the same digest keeps its state.
        Returns the row's state."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            row = db.execute("SELECT state, config_digest FROM pulls WHERE pull_key = ? AND series_instance_uid = ?",
                             (pull_key, series_uid)).fetchone()
            if row is not None and row["state"] == PullState.COMPLETED.value and row["config_digest"] == digest:
                return PullState.COMPLETED
            if row is not None and row["state"] == PullState.RETRIEVING.value and state is PullState.FOUND:
                return PullState.RETRIEVING  # interrupted: retrieved again
            db.execute(
                """INSERT INTO pulls (pull_key, series_instance_uid, study_instance_uid, source, config_digest, state,
                                      reason, found_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(pull_key, series_instance_uid) DO UPDATE SET config_digest = excluded.config_digest,
                       state = excluded.state, reason = excluded.reason, updated_at = excluded.updated_at""",
                (pull_key, series_uid, study_uid, source, digest, state.value, reason, now, now),
            )
        return state

    def completed_before(self, series_uid: str, digest: str) -> bool:
        """Whether some pull completed the series with this configuration digest."""
        with self.db.lock:
            row = self.db.connection.execute(
                "SELECT 1 FROM pulls WHERE series_instance_uid = ? AND state = ? AND config_digest = ? LIMIT 1",
                (series_uid, PullState.COMPLETED.value, digest)).fetchone()
        return row is not None

    def set_state(self, pull_key: str, series_uid: str, state: PullState, *, reason: str | None = None,
                  instances: int | None = None, job_id: int | None = None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            db.execute(
                """UPDATE pulls SET state = ?, reason = ?, instances = COALESCE(?, instances),
                       job_id = COALESCE(?, job_id), updated_at = ?
                   WHERE pull_key = ? AND series_instance_uid = ?""",
                (state.value, reason, instances, job_id, now, pull_key, series_uid),
            )

    def series(self, pull_key: str) -> list[PulledSeries]:
        """The pull's series in the order found, each with its newest job's state."""
        with self.db.lock:
            rows = self.db.connection.execute(
                """SELECT p.*, (SELECT j.state FROM jobs j WHERE j.series_instance_uid = p.series_instance_uid
                                ORDER BY j.id DESC LIMIT 1) AS job_state
                   FROM pulls p WHERE p.pull_key = ? ORDER BY p.found_at, p.series_instance_uid""",
                (pull_key,)).fetchall()
        return [PulledSeries(row["series_instance_uid"], row["study_instance_uid"], PullState(row["state"]),
                             row["reason"], row["instances"], row["job_id"], row["config_digest"], row["job_state"])
                for row in rows]


def held_series(db: Database) -> set[str]:
    """Series a pull is retrieving (or was, when it was stopped) or failed to retrieve
    whole: completion leaves them to the pull, which completes each once a retrieve of it
    ended whole (a pull run again retries a failed one), so that no job is made of part
    of a series."""
    with db.lock:
        rows = db.connection.execute(
            "SELECT DISTINCT series_instance_uid FROM pulls WHERE state IN (?, ?)",
            (PullState.RETRIEVING.value, PullState.FAILED.value)).fetchall()
    return {row[0] for row in rows}

