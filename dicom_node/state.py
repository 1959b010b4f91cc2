"""The durable state store (SQLite): instances, series and jobs.

Every received instance is recorded here before its C-STORE success goes back, so the
store and the spool together are the node's memory across crashes. The database runs
in WAL mode with ``synchronous=FULL``: a committed row survives a power cut.

Job life cycle (``JobState``)::

    received -> processing -> sending -> sent
                    |             |
                    +-> no_result  +-> failed (after the last send attempt)
                    +-> skipped (policy: e.g. a T2 series, a localizer)
                    +-> failed (pipeline error, with its reason)

``received`` jobs wait for the worker, ``sending`` jobs wait for their next attempt.
On start, ``processing`` jobs go back to ``received`` (they were interrupted).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = ["JobState", "SeriesRef", "Job", "StateStore", "TERMINAL_STATES"]


class JobState(str, Enum):
    RECEIVED = "received"
    PROCESSING = "processing"
    SENDING = "sending"
    SENT = "sent"
    NO_RESULT = "no_result"
    SKIPPED = "skipped"
    FAILED = "failed"


TERMINAL_STATES = frozenset({JobState.SENT, JobState.NO_RESULT, JobState.SKIPPED, JobState.FAILED})


@dataclass(frozen=True)
class SeriesRef:
    study_instance_uid: str
    series_instance_uid: str
    calling_ae_title: str
    folder: Path


@dataclass(frozen=True)
class Job:
    id: int
    series: SeriesRef
    state: JobState
    attempts: int
    reason: str | None
    sequence_class: str | None  # T1, T2, PD, other: what the classifier decided
    preprocessing: str | None  # the preprocessing mode used, if the series was segmented
    result_path: Path | None
    next_attempt_at: float
    created_at: float
    updated_at: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    calling_ae_title    TEXT NOT NULL,
    folder              TEXT NOT NULL,
    first_received_at   REAL NOT NULL,
    last_received_at    REAL NOT NULL,
    receiving           INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
    sop_class_uid       TEXT NOT NULL,
    path                TEXT NOT NULL,
    received_at         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    reason              TEXT,
    sequence_class      TEXT,
    preprocessing       TEXT,
    result_path         TEXT,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    purged              INTEGER NOT NULL DEFAULT 0,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
"""

_JOB_COLUMNS = """
    j.id, j.state, j.attempts, j.reason, j.sequence_class, j.preprocessing, j.result_path, j.next_attempt_at,
    j.created_at, j.updated_at,
    s.study_instance_uid, s.series_instance_uid, s.calling_ae_title, s.folder
"""


class StateStore:
    """Thread-safe access to the node's SQLite database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions ---------------------------------------------------------------
    def _transaction(self) -> "_Transaction":
        return _Transaction(self)

    # -- instances and series -------------------------------------------------------
    def record_instance(
        self,
        series: SeriesRef,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        now: float | None = None,
    ) -> None:
        """Record a received instance; (re)opens its series for receiving."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                """INSERT INTO series (series_instance_uid, study_instance_uid, calling_ae_title,
                                       folder, first_received_at, last_received_at, receiving)
                   VALUES (?, ?, ?, ?, ?, ?, 1)
                   ON CONFLICT(series_instance_uid) DO UPDATE
                   SET last_received_at = excluded.last_received_at, receiving = 1""",
                (
                    series.series_instance_uid,
                    series.study_instance_uid,
                    series.calling_ae_title,
                    str(series.folder),
                    now,
                    now,
                ),
            )
            db.execute(
                """INSERT INTO instances (sop_instance_uid, series_instance_uid, sop_class_uid, path, received_at)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(sop_instance_uid) DO UPDATE
                   SET path = excluded.path, received_at = excluded.received_at""",
                (sop_instance_uid, series.series_instance_uid, sop_class_uid, str(path), now),
            )

    def instance_paths(self, series_instance_uid: str) -> list[Path]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE series_instance_uid = ? ORDER BY path",
                (series_instance_uid,),
            ).fetchall()
        return [Path(row[0]) for row in rows]

    def instance_count(self, series_instance_uid: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", (series_instance_uid,)
            ).fetchone()
        return int(row[0])

    def receiving_series(self) -> list[tuple[str, float]]:
        """(SeriesInstanceUID, last_received_at) of series still receiving."""
        with self._lock:
            return list(
                self._db.execute(
                    "SELECT series_instance_uid, last_received_at FROM series WHERE receiving = 1"
                    " ORDER BY first_received_at"
                )
            )

    def restart_completion_timers(self, now: float | None = None) -> int:
        """After a restart, give series still receiving a full stable period again."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return db.execute(
                "UPDATE series SET last_received_at = ? WHERE receiving = 1", (now,)
            ).rowcount

    def complete_series(self, series_instance_uid: str, now: float | None = None) -> int | None:
        """Close a receiving series and create its job; returns the job id (None if not receiving)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE series SET receiving = 0 WHERE series_instance_uid = ? AND receiving = 1",
                (series_instance_uid,),
            ).rowcount
            if not updated:
                return None
            cursor = db.execute(
                """INSERT INTO jobs (series_instance_uid, state, created_at, updated_at)
                   VALUES (?, ?, ?, ?)""",
                (series_instance_uid, JobState.RECEIVED.value, now, now),
            )
            return int(cursor.lastrowid)

    # -- jobs -----------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_instance_uid)"
                " WHERE j.id = ?",
                (job_id,),
            ).fetchone()
        return _job(row) if row else None

    def jobs(self, state: JobState | None = None) -> list[Job]:
        query = f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_instance_uid)"
        params: tuple = ()
        if state is not None:
            query += " WHERE j.state = ?"
            params = (state.value,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY j.id", params).fetchall()
        return [_job(row) for row in rows]

    def job_counts(self) -> dict[JobState, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): count for state, count in rows}

    def check_writable(self) -> None:
        """Raise ``sqlite3.Error`` unless a write transaction can be opened."""
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS health (checked_at REAL)")
            db.execute("DELETE FROM health")
            db.execute("INSERT INTO health VALUES (?)", (time.time(),))

    def purgeable_jobs(self, before: float) -> list[Job]:
        """Sent jobs older than ``before`` whose series has no other job still open or failed."""
        query = f"""SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_instance_uid)
            WHERE j.state = ? AND j.purged = 0 AND j.updated_at < ? AND s.receiving = 0
              AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.series_instance_uid = j.series_instance_uid
                              AND o.id != j.id AND o.state != ? AND o.purged = 0)
            ORDER BY j.id"""
        with self._lock:
            rows = self._db.execute(query, (JobState.SENT.value, before, JobState.SENT.value)).fetchall()
        return [_job(row) for row in rows]

    def mark_purged(self, job_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET purged = 1 WHERE id = ?", (job_id,))
            db.execute(
                "DELETE FROM instances WHERE series_instance_uid = (SELECT series_instance_uid FROM jobs WHERE id = ?)",
                (job_id,),
            )

    def claim_next_job(self, now: float | None = None) -> Job | None:
        """The oldest runnable job, moved to ``processing`` if it was ``received``.

        Sending jobs whose retry time has come are returned as they are.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(
                """SELECT id, state FROM jobs
                   WHERE state = ? OR (state = ? AND next_attempt_at <= ?)
                   ORDER BY id LIMIT 1""",
                (JobState.RECEIVED.value, JobState.SENDING.value, now),
            ).fetchone()
            if row is None:
                return None
            if row[1] == JobState.RECEIVED.value:
                db.execute(
                    "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                    (JobState.PROCESSING.value, now, row[0]),
                )
        return self.job(row[0])

    def next_wakeup(self) -> float | None:
        """When the earliest waiting send attempt is due, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE state = ?", (JobState.SENDING.value,)
            ).fetchone()
        return row[0]

    def update_job(
        self,
        job_id: int,
        state: JobState,
        *,
        reason: str | None = None,
        sequence_class: str | None = None,
        preprocessing: str | None = None,
        result_path: Path | None = None,
        attempts: int | None = None,
        next_attempt_at: float | None = None,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        sets = ["state = ?", "reason = ?", "updated_at = ?"]
        params: list = [state.value, reason, now]
        for column, value in (
            ("sequence_class", sequence_class),
            ("preprocessing", preprocessing),
            ("result_path", None if result_path is None else str(result_path)),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        if attempts is not None:
            sets.append("attempts = ?")
            params.append(attempts)
        if next_attempt_at is not None:
            sets.append("next_attempt_at = ?")
            params.append(next_attempt_at)
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job_id))

    def resume_interrupted(self, now: float | None = None) -> int:
        """Jobs that were ``processing`` when the node stopped run again."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                (JobState.RECEIVED.value, now, JobState.PROCESSING.value),
            ).rowcount

    def requeue(self, job_id: int, now: float | None = None) -> Job:
        """Queue a failed job again: from its SEG if one was made, else from the series."""
        now = time.time() if now is None else now
        job = self.job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        if job.state is not JobState.FAILED:
            raise ValueError(f"job {job_id} is {job.state.value}, only failed jobs can be retried")
        has_result = job.result_path is not None and job.result_path.exists()
        state = JobState.SENDING if has_result else JobState.RECEIVED
        self.update_job(job_id, state, reason=None, attempts=0, next_attempt_at=now, now=now)
        return self.job(job_id)  # type: ignore[return-value]


class _Transaction:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._lock.acquire()
        try:
            self._store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._store._lock.release()
            raise
        return self._store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._store._lock.release()


def _job(row: tuple) -> Job:
    (job_id, state, attempts, reason, sequence_class, preprocessing, result_path, next_attempt_at,
     created, updated, study, series, calling_ae, folder) = row
    return Job(
        id=job_id,
        series=SeriesRef(study, series, calling_ae, Path(folder)),
        state=JobState(state),
        attempts=attempts,
        reason=reason,
        sequence_class=sequence_class,
        preprocessing=preprocessing,
        result_path=Path(result_path) if result_path else None,
        next_attempt_at=next_attempt_at,
        created_at=created,
        updated_at=updated,
    )


