"""The durable state store (SQLite): instances, series and jobs.

Every received instance is recorded here before its C-STORE success goes back, so the
store and the spool together are the node's memory across crashes. The database runs
in WAL mode with ``synchronous=FULL``: a committed row survives a power cut.

Job life cycle (``JobState``)::

    received -> processing -> sending -> sent
                    |             |
                    +-> no_result  +-> failed (after the last send attempt, or a permanent refusal)
                    +-> skipped (policy: e.g. a T2 series, a localizer)
                    +-> failed (pipeline error, with its reason)
    received, processing, sending -> superseded (the series grew: a newer job replaces it)

``received`` jobs wait for the worker. A ``sending`` job has its result objects in the
outbox: one row per (job, destination, object) with its own state (``pending``,
``sent``, ``failed``), attempts and next attempt, so a destination that is down never
holds up another. The job is ``sent`` when every row is sent, ``failed`` when none is
pending any more and one failed; its ``attempts`` and ``last_error`` sum up its rows.
On start, ``processing`` jobs go back to ``received`` (they were interrupted).

Review before sending: the rows of a destination with ``review: required`` are written
``held``, the others ``pending`` (a research archive is not held). A job stays
``sending`` while a row is pending and is ``review`` once only held rows remain open
(at once when all its rows are held). ``approve`` makes the held rows pending (the job
``sending``, then ``sent``); ``reject`` makes them ``rejected`` with the reviewer's
reason added to the job's; ``expire_reviews`` makes those held past
``review.expire_days`` ``expired``. When no row is open, the job ends ``failed`` if a
send failed, else ``rejected`` or ``expired``, else ``sent``. Who decided, when and why
is kept in ``reviews`` (``review``).

A job covers a snapshot of its series: the instances received up to the moment the
series completed (``Job.upto_seq``, a receive sequence number). An instance that
arrives later reopens the series; when it completes again, a new job covers the grown
series and every older job of that series that has not been sent yet is ``superseded``
(its result is never sent). A series that completes again without any new instance
(a sender repeating itself) gets no new job unless its last job failed.

An ended job (``sent``, ``skipped``, ``no_result``, ``failed``) can be processed again
as a new job over the same instances (``reprocess``; ``Job.reprocess_of`` names the
job it repeats), for example after a policy change.

Retention (``dicom_node.store.retention``) reads the series none of whose jobs is open
(``ended_series``) and deletes one in a transaction that first checks it is still as
seen (``purge_series``): instance rows go with their files, job rows stay, ``purged``.

Timestamps: the database itself stamps every job as its state changes (triggers, so
that every writer, whichever function moves the job, is covered): ``received_at`` (the
first instance the job covers arrived), ``completed_at`` (the series completed; the job
was created), ``queued_at`` (it was queued for processing: created, or queued again by
``retry``), ``processing_at`` (the worker took it), ``processed_at`` (the pipeline
ended: results to send, skipped, no result or failed) and ``sent_at`` (the last outbox
row was sent). Every send attempt is logged in ``sends`` with its destination and
outcome: each destination's recent history, which readiness (``/readyz``) reads.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Callable, Collection, Mapping

from dicom_node.store.db import Database
from dicom_node.store.schema import migrate

__all__ = [
    "JobState", "SeriesRef", "Job", "JobUpdate", "Refused", "OutboxState", "OutboxItem", "OutboxCounts", "StateStore",
    "TERMINAL_STATES", "Review", "ReviewDecision", "EndedSeries", "StoredInstance",
]


class JobState(str, Enum):
    RECEIVED = "received"
    PROCESSING = "processing"
    SENDING = "sending"
    SENT = "sent"
    NO_RESULT = "no_result"
    SKIPPED = "skipped"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    REVIEW = "review"  # results held for a reviewer (a destination with ``review: required``)
    REJECTED = "rejected"  # a reviewer rejected its held results, with a reason: nothing held was sent
    EXPIRED = "expired"  # its held results waited past ``review.expire_days``: nothing held was sent


class ReviewDecision(str, Enum):
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"  # nobody decided within ``review.expire_days``


class OutboxState(str, Enum):
    PENDING = "pending"  # waiting for its (next) attempt
    SENT = "sent"
    FAILED = "failed"  # refused permanently, or the last attempt failed (``retry`` queues it again)
    HELD = "held"  # waiting for a reviewer's approval (``review: required``)
    REJECTED = "rejected"  # a reviewer rejected it: never sent
    EXPIRED = "expired"  # unreviewed past ``review.expire_days``: never sent


TERMINAL_STATES = frozenset(
    {JobState.SENT, JobState.NO_RESULT, JobState.SKIPPED, JobState.FAILED, JobState.SUPERSEDED, JobState.REJECTED,
     JobState.EXPIRED}
)
_UNSENT_STATES = (JobState.RECEIVED.value, JobState.PROCESSING.value, JobState.SENDING.value, JobState.REVIEW.value)

# ``write_problem``: how long a write refused as full is reported, and the room the
# database needs (a WAL of up to 1000 pages, ~4 MiB, before it is checkpointed, and the
# checkpoint's growth of the database file)
_FULL_REPORTED_SECONDS = 60.0
_FULL_MARGIN_PAGES = 16
_FULL_MARGIN_BYTES = 16 * 1024 * 1024


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
    upto_seq: int = 0  # the job covers the series' instances received up to this sequence number
    seg_series_uid: str | None = None  # SeriesInstanceUID of the SEG it produced
    last_error: str | None = None  # the latest failed attempt, kept apart from the outcome's reason
    received_at: float | None = None  # the first instance the job covers arrived
    completed_at: float | None = None  # its series completed (the job was created)
    processing_at: float | None = None  # the worker took it (the latest time)
    processed_at: float | None = None  # the pipeline ended (SEG made, skipped, no result, failed)
    sent_at: float | None = None  # the destination took its SEG
    reprocess_of: int | None = None  # the ended job this one processes again
    model_run: str | None = None  # where the model ran and what it cost: "WORKER on DEVICE, load Xs, ..."
    routing: str | None = None  # the routing decision and why (``dicom_node.work.plan.Plan.explanation``)
    model_outcomes: str | None = None  # one line per model preset that the rules chose: "NAME: what happened"
    allow_partial: bool = False  # processed although its series is known not whole (``retry --allow-partial``)
    queued_at: float | None = None  # it was queued for processing: created, or queued again by ``retry``

    @property
    def queued_since(self) -> float:
        """When it was last queued for processing (its creation for a database of an
        earlier release)."""
        return self.queued_at if self.queued_at is not None else self.created_at

    def stage_seconds(self) -> dict[str, float | None]:
        """Seconds per stage: receiving (first instance to completion), queued (from its
        last queuing, ``queued_since``, to the worker: a job processed again, or queued
        again by ``retry``, counts from then, not from its series' completion),
        processing (the pipeline) and sending (SEG made to sent); None for a
        stage not reached (or from a database older than the timestamps)."""
        def between(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round(max(end - start, 0.0), 3)

        return {
            "receiving": between(self.received_at, self.completed_at),
            "queued": between(self.queued_since, self.processing_at),
            "processing": between(self.processing_at, self.processed_at),
            "sending": between(self.processed_at, self.sent_at),
        }


@dataclass(frozen=True)
class OutboxItem:
    """One result object of a job, for one destination."""

    id: int
    job_id: int
    destination: str
    object: str  # the object's key: seg, seg-labelmap, rtstruct, overlay, report
    path: Path  # the folder of its files
    state: OutboxState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    warning: str | None
    sent_at: float | None


@dataclass(frozen=True)
class OutboxCounts:
    """A destination's outbox: rows pending (of jobs still sending), sent and failed."""

    pending: int = 0
    sent: int = 0
    failed: int = 0
    held: int = 0  # waiting for a reviewer (of jobs in review or still sending)


@dataclass(frozen=True)
class Review:
    """A job's objects held for a reviewer, and what was decided (``reviews``)."""

    job_id: int
    held_at: float  # the objects were made and held
    decision: ReviewDecision | None  # None: still waiting
    decided_at: float | None
    reviewer: str | None  # who decided (the page's client, or the operator at the command line)
    reason: str | None  # a rejection's reason, or why it expired


@dataclass(frozen=True)
class Refused:
    """An instance the node refused at C-STORE and has not stored since."""

    sop_instance_uid: str
    status: int  # the DICOM status answered
    reason: str


@dataclass(frozen=True)
class EndedSeries:
    """A series none of whose jobs is open, as retention saw it (``ended_series``):
    what ``purge_series`` checks again before it deletes anything."""

    series: SeriesRef
    jobs: tuple[Job, ...]  # its jobs not purged yet, by id
    upto_seq: int  # the receive sequence number of its newest instance then (0: none)


@dataclass(frozen=True)
class StoredInstance:
    """An instance row as ``purge_series`` hands it over for deletion."""

    sop_instance_uid: str
    path: Path
    received_at: float  # when it was last recorded: its file is no newer unless it is being received again


@dataclass(frozen=True)
class JobUpdate:
    """What a job's move to a new state records besides the state. ``reason`` is always
    written (None clears it); every other field only when it is given."""

    reason: str | None = None
    sequence_class: str | None = None
    preprocessing: str | None = None
    result_path: Path | None = None
    seg_series_uid: str | None = None
    last_error: str | None = None
    model_run: str | None = None
    routing: str | None = None
    model_outcomes: str | None = None
    attempts: int | None = None
    next_attempt_at: float | None = None

    def columns(self) -> dict[str, object]:
        """Column -> value of the fields given, ``reason`` always."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        given = {name: value for name, value in values.items() if value is not None or name == "reason"}
        if isinstance(given.get("result_path"), Path):
            given["result_path"] = str(given["result_path"])
        return given


# what the outbox adds to a job's reason when it ends (taken off again when it is retried)
_SEND_FAILED = "; send failed: "
_SENT_WITH_WARNING = "; sent with warning "
_REJECTED = "; rejected by review: "  # what a reviewer said (``reject``), kept when its sends are retried
_EXPIRED = "; review expired: "

_REPROCESSABLE = frozenset({JobState.SENT, JobState.SKIPPED, JobState.NO_RESULT, JobState.FAILED, JobState.REJECTED,
                            JobState.EXPIRED})


# A job's columns, named as ``Job``'s fields (its series from the series table): rows are
# read by these names, so a new field needs only its column.
_SERIES_COLUMNS = ("study_instance_uid", "series_instance_uid", "calling_ae_title", "folder")
_JOB_COLUMNS = ", ".join(
    [f"j.{field.name}" for field in fields(Job) if field.name != "series"] + [f"s.{name}" for name in _SERIES_COLUMNS]
)


class StateStore:
    """Thread-safe access to the node's SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = Database(path)
        migrate(self.db)
        # series UID -> its instance count, kept as instances are recorded so that the
        # intake's size check is no COUNT per instance; never low (see series_has_room)
        self._sizes: dict[str, int] = {}

    def close(self) -> None:
        self.db.close()

    # -- instances and series -------------------------------------------------------
    def record_instance(
        self,
        series: SeriesRef,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        now: float | None = None,
        placement: str | None = None,
    ) -> None:
        """Record a received instance; (re)opens its series for receiving.

        A new instance gets the next receive sequence number; an instance received again
        keeps its number, so a sender repeating itself does not grow the series. Numbers
        never go back, not even after retention deleted the newest rows: the next is above
        every instance's and every job's (whose snapshot ends there).
        ``placement`` is what series completion needs to know of it (JSON, see
        ``pipeline.input.wholeness``).
        The row goes in by group commit (``Database.grouped``): concurrent callers share
        one transaction and its fsync, and each returns only once its row is committed.
        """
        now = time.time() if now is None else now

        def insert(db: sqlite3.Connection) -> None:
            _open_series(db, series, now)
            db.execute(
                """INSERT INTO instances (sop_instance_uid, series_instance_uid, sop_class_uid, path, received_at,
                                          seq, placement)
                   VALUES (?, ?, ?, ?, ?, (SELECT MAX((SELECT COALESCE(MAX(seq), 0) FROM instances),
                                                  (SELECT COALESCE(MAX(upto_seq), 0) FROM jobs)) + 1), ?)
                   ON CONFLICT(sop_instance_uid) DO UPDATE
                   SET path = excluded.path, received_at = excluded.received_at, placement = excluded.placement""",
                (sop_instance_uid, series.series_instance_uid, sop_class_uid, str(path), now, placement),
            )
            db.execute("DELETE FROM refusals WHERE sop_instance_uid = ?", (sop_instance_uid,))  # resent, taken

        self.db.grouped(insert)
        with self.db.lock:  # after the commit: a count taken since then may hold it twice (high, never low)
            if series.series_instance_uid in self._sizes:
                self._sizes[series.series_instance_uid] += 1

    def series_has_room(self, series_instance_uid: str, limit: int) -> bool:
        """Whether the series holds fewer than ``limit`` instances. Answered from the
        count kept as instances are recorded, which may run high (an instance received
        again counts again; retention deletes rows) but never low; counted again in the
        database before saying no."""
        with self.db.lock:  # no commit runs meanwhile: a count and the increments agree
            size = self._sizes.get(series_instance_uid)
            if size is None or size >= limit:
                if len(self._sizes) >= 1024:  # bounded: the series of the last while
                    self._sizes.clear()
                size = self._sizes[series_instance_uid] = self.instance_count(series_instance_uid)
        return size < limit

    def instance_paths(self, series_instance_uid: str, upto_seq: int | None = None) -> list[Path]:
        """The series' instance files (those received up to ``upto_seq``, if given)."""
        limit = upto_seq if upto_seq is not None else 2**62
        with self.db.lock:
            rows = self.db.connection.execute(
                "SELECT path FROM instances WHERE series_instance_uid = ? AND seq <= ? ORDER BY path",
                (series_instance_uid, limit),
            ).fetchall()
        return [Path(row[0]) for row in rows]

    def placements(self, series_instance_uid: str) -> list[str | None]:
        """The recorded placement (JSON) of every instance of the series."""
        with self.db.lock:
            rows = self.db.connection.execute(
                "SELECT placement FROM instances WHERE series_instance_uid = ? ORDER BY seq",
                (series_instance_uid,),
            ).fetchall()
        return [row[0] for row in rows]

    def instance_count(self, series_instance_uid: str) -> int:
        with self.db.lock:
            row = self.db.connection.execute(
                "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", (series_instance_uid,)
            ).fetchone()
        return int(row[0])

    def record_refusal(self, series: SeriesRef, sop_instance_uid: str, status: int, reason: str,
                       now: float | None = None) -> None:
        """An instance of the series the node refused, with the status it answered and
        why; forgotten when the same instance is later stored. The series counts as not
        whole while one is outstanding (``refusals``), and a refusal (re)opens it like a
        received instance, so that its timer ends it even when nothing was stored."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            _open_series(db, series, now)
            db.execute(
                "INSERT INTO refusals (series_instance_uid, sop_instance_uid, status, reason, at) VALUES (?, ?, ?, ?, ?)",
                (series.series_instance_uid, sop_instance_uid, status, reason, now),
            )

    def refusals(self, series_instance_uid: str) -> list[Refused]:
        """The series' instances refused and not stored since: (SOP instance, status,
        reason), the latest refusal of each."""
        with self.db.lock:
            rows = self.db.connection.execute(
                """SELECT sop_instance_uid, status, reason FROM refusals WHERE id IN (
                       SELECT MAX(id) FROM refusals WHERE series_instance_uid = ? GROUP BY sop_instance_uid)
                   ORDER BY id""",
                (series_instance_uid,),
            ).fetchall()
        return [Refused(row["sop_instance_uid"], row["status"], row["reason"]) for row in rows]

    def fail_incomplete_series(self, series_instance_uid: str, reason: str, now: float | None = None) -> int | None:
        """Close a receiving series that is known not to be whole and record it as a job
        that ``failed`` with ``reason`` (it is never processed; ``retry --reprocess
        --allow-partial`` processes it on purpose). None when it was not receiving."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            if not db.execute("UPDATE series SET receiving = 0 WHERE series_instance_uid = ? AND receiving = 1",
                              (series_instance_uid,)).rowcount:
                return None
            upto = db.execute("SELECT COALESCE(MAX(seq), 0) FROM instances WHERE series_instance_uid = ?",
                              (series_instance_uid,)).fetchone()[0]
            cursor = db.execute(
                """INSERT INTO jobs (series_instance_uid, state, reason, created_at, updated_at, upto_seq)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (series_instance_uid, JobState.FAILED.value, reason, now, now, upto),
            )
            job_id = int(cursor.lastrowid)
            db.execute(
                f"""UPDATE jobs SET state = ?, updated_at = ?, reason = 'superseded by job ' || ?
                    WHERE series_instance_uid = ? AND id < ? AND state IN ({",".join("?" * len(_UNSENT_STATES))})""",
                (JobState.SUPERSEDED.value, now, job_id, series_instance_uid, job_id, *_UNSENT_STATES),
            )
            return job_id

    def receiving_series(self) -> list[tuple[str, float]]:
        """(SeriesInstanceUID, last_received_at) of series still receiving."""
        with self.db.lock:
            rows = self.db.connection.execute(
                "SELECT series_instance_uid, last_received_at FROM series WHERE receiving = 1"
                " ORDER BY first_received_at"
            ).fetchall()
        return [(row["series_instance_uid"], row["last_received_at"]) for row in rows]

    def restart_completion_timers(self, now: float | None = None) -> int:
        """After a restart, give series still receiving a full stable period again."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            return db.execute(
                "UPDATE series SET last_received_at = ? WHERE receiving = 1", (now,)
            ).rowcount

    def complete_series(self, series_instance_uid: str, now: float | None = None) -> int | None:
        """Close a receiving series and create its job; returns the job id.

        None when the series was not receiving, or when nothing new arrived since its
        last job and that job did not fail. Older jobs of the series that have not been
        sent are superseded by the new one in the same transaction.
        """
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            updated = db.execute(
                "UPDATE series SET receiving = 0 WHERE series_instance_uid = ? AND receiving = 1",
                (series_instance_uid,),
            ).rowcount
            if not updated:
                return None
            upto, count = db.execute(
                "SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM instances WHERE series_instance_uid = ?",
                (series_instance_uid,),
            ).fetchone()
            last = db.execute(
                "SELECT id, state, upto_seq FROM jobs WHERE series_instance_uid = ? ORDER BY id DESC LIMIT 1",
                (series_instance_uid,),
            ).fetchone()
            if last is not None and last[2] == upto and last[1] != JobState.FAILED.value:
                return None  # the same instances again: job last[0] stands
            cursor = db.execute(
                """INSERT INTO jobs (series_instance_uid, state, created_at, updated_at, upto_seq)
                   VALUES (?, ?, ?, ?, ?)""",
                (series_instance_uid, JobState.RECEIVED.value, now, now, upto),
            )
            job_id = int(cursor.lastrowid)
            db.execute(
                f"""UPDATE jobs SET state = ?, updated_at = ?,
                        reason = 'superseded by job ' || ? || ': the series grew to ' || ? || ' instances'
                    WHERE series_instance_uid = ? AND id < ? AND state IN ({",".join("?" * len(_UNSENT_STATES))})""",
                (JobState.SUPERSEDED.value, now, job_id, count, series_instance_uid, job_id, *_UNSENT_STATES),
            )
            return job_id

    def sent_seg_series(self, series_instance_uid: str, before_job: int) -> str | None:
        """The SEG series of the latest earlier job of this series that was sent, if any,
        and that covered fewer instances: a job that processes the same instances again
        (``reprocess``) makes the same SEG under the same UIDs unless its content changed."""
        with self.db.lock:
            row = self.db.connection.execute(
                """SELECT seg_series_uid FROM jobs WHERE series_instance_uid = ? AND id < ? AND state = ?
                   AND seg_series_uid IS NOT NULL
                   AND upto_seq < (SELECT upto_seq FROM jobs WHERE id = ?) ORDER BY id DESC LIMIT 1""",
                (series_instance_uid, before_job, JobState.SENT.value, before_job),
            ).fetchone()
        return row[0] if row else None

    def sent_object_series(self, series_instance_uid: str, before_job: int, key: str) -> str | None:
        """The series of object ``key`` (``seg``, ``kidney.seg``, ...) that the latest
        earlier job of this series sent somewhere, if that job covered fewer instances:
        what the new object of a grown series says it replaces. None also for jobs of a
        release whose outbox did not record series (``sent_seg_series`` knows their SEG)."""
        with self.db.lock:
            row = self.db.connection.execute(
                """SELECT o.series_uid FROM outbox o JOIN jobs j ON j.id = o.job_id
                   WHERE j.series_instance_uid = ? AND j.id < ? AND o.object = ? AND o.state = ?
                   AND o.series_uid IS NOT NULL
                   AND j.upto_seq < (SELECT upto_seq FROM jobs WHERE id = ?) ORDER BY j.id DESC LIMIT 1""",
                (series_instance_uid, before_job, key, OutboxState.SENT.value, before_job),
            ).fetchone()
        return row[0] if row else None

    # -- jobs -----------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        with self.db.lock:
            row = self.db.connection.execute(
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
        with self.db.lock:
            rows = self.db.connection.execute(query + " ORDER BY j.id", params).fetchall()
        return [_job(row) for row in rows]

    def job_counts(self) -> dict[JobState, int]:
        with self.db.lock:
            rows = self.db.connection.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): count for state, count in rows}

    def check_writable(self) -> None:
        """Raise ``sqlite3.Error`` unless a write transaction can be opened."""
        with self.db.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS health (checked_at REAL)")
            db.execute("DELETE FROM health")
            db.execute("INSERT INTO health VALUES (?)", (time.time(),))

    def write_problem(self, now: float | None = None) -> str | None:
        """Why the database cannot take writes (None: it can): a write refused as full in
        the last minute, the database at its page limit, or its disk nearly full. Reads
        only, so that asking never uses the space it is about."""
        now = time.time() if now is None else now
        problems = []
        if self.db.full_at is not None and now - self.db.full_at < _FULL_REPORTED_SECONDS:
            problems.append(f"a write was refused {now - self.db.full_at:.0f}s ago: {self.db.full_error}")
        with self.db.lock:
            pages, limit, free_pages = (self.db.connection.execute(f"PRAGMA {name}").fetchone()[0]
                                        for name in ("page_count", "max_page_count", "freelist_count"))
        if limit - pages + free_pages < _FULL_MARGIN_PAGES:
            problems.append(f"the database is full: {pages} of at most {limit} pages")
        free = shutil.disk_usage(self.path.parent).free
        if free < _FULL_MARGIN_BYTES:
            problems.append(f"{free} bytes free on its disk, below {_FULL_MARGIN_BYTES}")
        return f"state store {self.path}: " + "; ".join(problems) if problems else None

    def ended_series(self) -> list[EndedSeries]:
        """Series that retention may consider: not receiving, no job open, some job not
        purged yet; each with its jobs and its newest instance as seen now."""
        with self.db.lock:
            rows = self.db.connection.execute(
                f"""SELECT {_JOB_COLUMNS}, (SELECT COALESCE(MAX(i.seq), 0) FROM instances i
                                            WHERE i.series_instance_uid = s.series_instance_uid) AS newest_seq
                    FROM jobs j JOIN series s USING (series_instance_uid)
                    WHERE s.receiving = 0 AND j.purged = 0
                      AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.series_instance_uid = s.series_instance_uid
                                      AND o.state IN ({",".join("?" * len(_UNSENT_STATES))}))
                    ORDER BY j.series_instance_uid, j.id""",
                _UNSENT_STATES,
            ).fetchall()
        grouped: dict[str, tuple[int, list[Job]]] = {}
        for row in rows:
            job = _job(row)
            grouped.setdefault(job.series.series_instance_uid, (int(row["newest_seq"]), []))[1].append(job)
        return [EndedSeries(jobs[0].series, tuple(jobs), newest) for newest, jobs in grouped.values()]

    def purge_series(self, seen: EndedSeries, delete: Callable[[list[StoredInstance]], None]) -> bool:
        """Delete a series retention decided on, if it is still as ``seen``: in one
        transaction (which every writer, ``record_instance`` too, waits for), check that
        it is not receiving, has no instance newer than ``seen.upto_seq`` and the same
        jobs in the same states; then ``delete`` the files of the instances known then,
        drop their rows and mark the jobs purged (their rows stay, the audit trail).
        False, and nothing touched, when the series changed since: retention decides again
        at its next run."""
        uid = seen.series.series_instance_uid
        with self.db.transaction() as db:
            receiving = db.execute("SELECT receiving FROM series WHERE series_instance_uid = ?", (uid,)).fetchone()
            newest = db.execute("SELECT COALESCE(MAX(seq), 0) FROM instances WHERE series_instance_uid = ?",
                                (uid,)).fetchone()[0]
            jobs = db.execute("SELECT id, state FROM jobs WHERE series_instance_uid = ? AND purged = 0 ORDER BY id",
                              (uid,)).fetchall()
            if (receiving is None or receiving[0] or newest != seen.upto_seq
                    or [(row[0], row[1]) for row in jobs] != [(job.id, job.state.value) for job in seen.jobs]):
                return False
            rows = db.execute(
                "SELECT sop_instance_uid, path, received_at FROM instances WHERE series_instance_uid = ? AND seq <= ?",
                (uid, seen.upto_seq),
            ).fetchall()
            delete([StoredInstance(row[0], Path(row[1]), row[2]) for row in rows])
            db.execute("DELETE FROM instances WHERE series_instance_uid = ? AND seq <= ?", (uid, seen.upto_seq))
            db.execute("DELETE FROM refusals WHERE series_instance_uid = ?", (uid,))  # the series ended; its jobs say why
            db.executemany("UPDATE jobs SET purged = 1 WHERE id = ?", [(job.id,) for job in seen.jobs])
        return True

    def claim_next_processing(self, now: float | None = None) -> Job | None:
        """The oldest ``received`` job, moved to ``processing``; None when there is none.
        Read and moved in one transaction, so several processing slots never take the
        same job and a failed read leaves it ``received``."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_instance_uid)"
                " WHERE j.state = ? ORDER BY j.id LIMIT 1",
                (JobState.RECEIVED.value,),
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (JobState.PROCESSING.value, now, job.id, JobState.RECEIVED.value),
            )
        return dataclasses.replace(job, state=JobState.PROCESSING, updated_at=now, processing_at=now)

    # -- the outbox -----------------------------------------------------------------
    def start_sending(
        self,
        job_id: int,
        items: list[tuple[str, str, Path]],
        update: JobUpdate = JobUpdate(),
        *,
        object_series: Mapping[str, str] | None = None,
        held: Collection[str] = (),
        now: float | None = None,
    ) -> bool:
        """Move a ``processing`` job to ``sending`` with its outbox rows, (destination,
        object key, folder) each, due now; ``object_series``: each object's
        SeriesInstanceUID by key (what a later job's object replaces, see
        ``sent_object_series``); ``update`` as for ``update_job``. The rows of the
        destinations ``held`` (``review: required``) wait for a reviewer (``approve``);
        a job with only held rows is ``review`` at once. False (and nothing written)
        when the job is no longer ``processing`` (superseded)."""
        series = object_series or {}
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            update = dataclasses.replace(update, next_attempt_at=now)
            if not self._update(db, job_id, JobState.SENDING, update, expect=JobState.PROCESSING, now=now):
                return False
            db.executemany(
                """INSERT INTO outbox (job_id, destination, object, path, state, next_attempt_at, series_uid)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(job_id, destination, key, str(folder),
                  (OutboxState.HELD if destination in held else OutboxState.PENDING).value, now, series.get(key))
                 for destination, key, folder in items],
            )
            if any(destination in held for destination, _, _ in items):
                db.execute("""INSERT INTO reviews (job_id, held_at) VALUES (?, ?) ON CONFLICT(job_id) DO UPDATE
                              SET held_at = excluded.held_at, decision = NULL, decided_at = NULL, reviewer = NULL,
                                  reason = NULL""", (job_id, now))
                self._settle_job(db, job_id, now)
        return True

    # -- review before sending ------------------------------------------------------
    def awaiting_review(self) -> list[Job]:
        """Jobs with objects held for a reviewer (``review``, or still ``sending`` to
        destinations that are not held), oldest first."""
        with self.db.lock:
            rows = self.db.connection.execute(
                f"""SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_instance_uid)
                    WHERE j.state IN (?, ?) AND EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id AND o.state = ?)
                    ORDER BY j.id""",
                (JobState.REVIEW.value, JobState.SENDING.value, OutboxState.HELD.value),
            ).fetchall()
        return [_job(row) for row in rows]

    def review(self, job_id: int) -> Review | None:
        """The review record of a job whose objects were held (None: none were)."""
        with self.db.lock:
            row = self.db.connection.execute(
                "SELECT job_id, held_at, decision, decided_at, reviewer, reason FROM reviews WHERE job_id = ?",
                (job_id,)).fetchone()
        if row is None:
            return None
        return Review(job_id=row["job_id"], held_at=row["held_at"],
                      decision=ReviewDecision(row["decision"]) if row["decision"] else None,
                      decided_at=row["decided_at"], reviewer=row["reviewer"], reason=row["reason"])

    def approve(self, job_id: int, reviewer: str, now: float | None = None) -> JobState:
        """A reviewer approved the job's held objects: they are due now (the send threads
        take them), the job is ``sending``. ``KeyError`` for an unknown job,
        ``ValueError`` (with the reason) for one with nothing held."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            self._held_rows(db, job_id)
            db.execute("UPDATE outbox SET state = ?, next_attempt_at = ? WHERE job_id = ? AND state = ?",
                       (OutboxState.PENDING.value, now, job_id, OutboxState.HELD.value))
            self._decide(db, job_id, ReviewDecision.APPROVED, reviewer, None, now)
            return self._settle_job(db, job_id, now)

    def reject(self, job_id: int, reason: str, reviewer: str, now: float | None = None) -> JobState:
        """A reviewer rejected the job's held objects, saying why: they are never sent,
        the reason is recorded in the job's. The job ends ``rejected`` (``failed`` if a
        send of it to another destination failed; ``sending`` until those ended).
        ``KeyError`` for an unknown job, ``ValueError`` for one with nothing held or
        without a reason."""
        reason = " ".join((reason or "").split())
        if not reason:
            raise ValueError("a rejection needs a reason")
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            self._held_rows(db, job_id)
            db.execute("UPDATE outbox SET state = ? WHERE job_id = ? AND state = ?",
                       (OutboxState.REJECTED.value, job_id, OutboxState.HELD.value))
            self._decide(db, job_id, ReviewDecision.REJECTED, reviewer, reason, now)
            self._add_to_reason(db, job_id, _REJECTED + reason)
            return self._settle_job(db, job_id, now)

    def expire_reviews(self, days: float, now: float | None = None) -> list[tuple[int, JobState]]:
        """Held objects nobody reviewed within ``days`` of being made are never sent;
        each job so changed with its new state (``expired``, or ``sending`` until its
        other sends ended). ``days`` 0: nothing expires."""
        if days <= 0:
            return []
        now = time.time() if now is None else now
        why = f"not reviewed within {days:g} day(s)"
        with self.db.transaction() as db:
            ids = [row[0] for row in db.execute(
                """SELECT r.job_id FROM reviews r JOIN jobs j ON j.id = r.job_id
                   WHERE r.decision IS NULL AND r.held_at <= ? AND j.state IN (?, ?)
                   AND EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = r.job_id AND o.state = ?)
                   ORDER BY r.job_id""",
                (now - days * 86400.0, JobState.REVIEW.value, JobState.SENDING.value, OutboxState.HELD.value))]
            ended = []
            for job_id in ids:
                db.execute("UPDATE outbox SET state = ? WHERE job_id = ? AND state = ?",
                           (OutboxState.EXPIRED.value, job_id, OutboxState.HELD.value))
                self._decide(db, job_id, ReviewDecision.EXPIRED, None, why, now)
                self._add_to_reason(db, job_id, _EXPIRED + why)
                ended.append((job_id, self._settle_job(db, job_id, now)))
        return ended

    @staticmethod
    def _held_rows(db: sqlite3.Connection, job_id: int) -> None:
        """Raise unless the job has objects held for review (``KeyError``: no such job)."""
        row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        held = db.execute("SELECT COUNT(*) FROM outbox WHERE job_id = ? AND state = ?",
                          (job_id, OutboxState.HELD.value)).fetchone()[0]
        if not held or row[0] not in (JobState.REVIEW.value, JobState.SENDING.value):
            raise ValueError(f"job {job_id} is {row[0]}; it has no objects waiting for review")

    @staticmethod
    def _decide(db: sqlite3.Connection, job_id: int, decision: ReviewDecision, reviewer: str | None,
                reason: str | None, now: float) -> None:
        db.execute("UPDATE reviews SET decision = ?, decided_at = ?, reviewer = ?, reason = ? WHERE job_id = ?",
                   (decision.value, now, reviewer, reason, job_id))

    @staticmethod
    def _add_to_reason(db: sqlite3.Connection, job_id: int, text: str) -> None:
        db.execute("UPDATE jobs SET reason = COALESCE(reason, '') || ? WHERE id = ?", (text, job_id))

    def adopt_unsent(self, destination: str, now: float | None = None) -> int:
        """Give ``sending`` jobs of an earlier release (one SEG, no outbox rows) an outbox
        row for ``destination``; the number adopted."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            rows = db.execute(
                """SELECT id, result_path, next_attempt_at FROM jobs j WHERE state = ? AND result_path IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)""",
                (JobState.SENDING.value,),
            ).fetchall()
            db.executemany(
                """INSERT INTO outbox (job_id, destination, object, path, state, next_attempt_at)
                   VALUES (?, ?, 'seg', ?, ?, ?)""",
                [(job_id, destination, str(Path(path).parent), OutboxState.PENDING.value, due)
                 for job_id, path, due in rows],
            )
        return len(rows)

    def fail_unconfigured(self, destinations: Collection[str], now: float | None = None) -> int:
        """Pending outbox rows for a destination the configuration no longer names fail
        (``retry --destination`` cannot reach them either; ``retry --reprocess`` makes the
        job again for the destinations configured now); their jobs are brought up to
        date. The number of rows."""
        now = time.time() if now is None else now
        known = tuple(destinations)
        with self.db.transaction() as db:
            rows = db.execute(
                f"""SELECT id, job_id, destination FROM outbox WHERE state = ?
                    AND destination NOT IN ({",".join("?" * len(known))})""",
                (OutboxState.PENDING.value, *known),
            ).fetchall()
            for item_id, _, destination in rows:
                db.execute("UPDATE outbox SET state = ?, last_error = ? WHERE id = ?",
                           (OutboxState.FAILED.value, f"destination {destination!r} is no longer in the configuration;"
                            " not sent", item_id))
            for job_id in sorted({row[1] for row in rows}):
                self._settle_job(db, job_id, now)
        return len(rows)

    def outbox(self, job_id: int) -> list[OutboxItem]:
        """A job's outbox rows, by destination and object."""
        return self.outboxes([job_id]).get(job_id, [])

    def outboxes(self, job_ids: list[int] | None = None) -> dict[int, list[OutboxItem]]:
        """The outbox rows of these jobs (None: of every job), by job, destination and object."""
        query = f"SELECT {_OUTBOX_COLUMNS} FROM outbox o"
        if job_ids is not None:
            query += f" WHERE o.job_id IN ({','.join('?' * len(job_ids))})"
        with self.db.lock:
            rows = self.db.connection.execute(query + " ORDER BY o.job_id, o.destination, o.object",
                                    tuple(job_ids or ())).fetchall()
        grouped: dict[int, list[OutboxItem]] = {}
        for row in rows:
            item = _outbox_item(row)
            grouped.setdefault(item.job_id, []).append(item)
        return grouped

    def claim_next_send(self, now: float | None = None, destination: str | None = None) -> OutboxItem | None:
        """The outbox row (for ``destination``, if named) whose attempt is due first, of a
        job still ``sending`` (it stays pending)."""
        now = time.time() if now is None else now
        where, params = ("", ()) if destination is None else (" AND o.destination = ?", (destination,))
        with self.db.lock:
            row = self.db.connection.execute(
                f"""SELECT {_OUTBOX_COLUMNS} FROM outbox o WHERE o.state = ? AND o.next_attempt_at <= ?
                    AND (SELECT state FROM jobs WHERE id = o.job_id) = ?{where}
                    ORDER BY o.next_attempt_at, o.id LIMIT 1""",
                (OutboxState.PENDING.value, now, JobState.SENDING.value, *params),
            ).fetchone()
        return _outbox_item(row) if row else None

    def next_wakeup(self, destination: str | None = None) -> float | None:
        """When the earliest waiting send attempt (to ``destination``, if named) is due, if any."""
        where, params = ("", ()) if destination is None else (" AND o.destination = ?", (destination,))
        with self.db.lock:
            row = self.db.connection.execute(
                f"""SELECT MIN(o.next_attempt_at) FROM outbox o JOIN jobs j ON j.id = o.job_id
                   WHERE o.state = ? AND j.state = ?{where}""",
                (OutboxState.PENDING.value, JobState.SENDING.value, *params),
            ).fetchone()
        return row[0]

    def record_send(
        self,
        item_id: int,
        *,
        ok: bool,
        error: str | None = None,
        warning: str | None = None,
        retry_at: float | None = None,
        now: float | None = None,
    ) -> JobState:
        """Record one send attempt of an outbox row and bring its job up to date; the
        job's state after it.

        ``ok``: the destination took the object (with ``warning`` if it gave one).
        Otherwise ``error`` says why, and ``retry_at`` when to try again (None: the row
        has failed for good, until ``retry``). The job becomes ``sent`` when all its rows
        are sent and ``failed`` when none is pending and one failed; a job that is no
        longer ``sending`` (superseded while the send ran) keeps its state."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            job_id, destination = db.execute(
                "SELECT job_id, destination FROM outbox WHERE id = ?", (item_id,)).fetchone()
            if ok:
                # its last_error stays: a send that went through at the second attempt shows why the first failed
                db.execute("""UPDATE outbox SET state = ?, attempts = attempts + 1, warning = ?, sent_at = ?
                              WHERE id = ?""", (OutboxState.SENT.value, warning, now, item_id))
            else:
                state = OutboxState.FAILED if retry_at is None else OutboxState.PENDING
                db.execute("""UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?,
                              next_attempt_at = ? WHERE id = ?""",
                           (state.value, error, retry_at if retry_at is not None else now, item_id))
            db.execute("INSERT INTO sends (job_id, destination, at, ok, error) VALUES (?, ?, ?, ?, ?)",
                       (job_id, destination, now, int(ok), None if ok else error))
            db.execute("DELETE FROM sends WHERE id <= (SELECT MAX(id) FROM sends) - 5000")
            return self._settle_job(db, job_id, now)

    def _settle_job(self, db: sqlite3.Connection, job_id: int, now: float) -> JobState:
        """Bring a ``sending`` (or ``review``) job up to date with its outbox rows (in the
        caller's transaction): ``sending`` while a row is pending; else ``review`` while
        one is held; else its outcome: ``failed`` if a send failed, else ``rejected`` or
        ``expired`` if a reviewer rejected or nobody reviewed its held rows, else ``sent``."""
        job_state = JobState(db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
        rows = db.execute(
            "SELECT destination, object, state, attempts, next_attempt_at, last_error, warning FROM outbox"
            " WHERE job_id = ? ORDER BY destination, object", (job_id,)).fetchall()
        if job_state not in (JobState.SENDING, JobState.REVIEW) or not rows:
            return job_state
        attempts = sum(row[3] for row in rows)
        by_state = {state: [row for row in rows if row[2] == state.value] for state in OutboxState}
        pending, failed = by_state[OutboxState.PENDING], by_state[OutboxState.FAILED]
        errors = [f"{row[0]} {row[1]}: {row[5]}" for row in rows if row[5]]
        last_error = "; ".join(errors) or None
        if pending:
            db.execute("UPDATE jobs SET state = ?, attempts = ?, last_error = ?, next_attempt_at = ?,"
                       " updated_at = CASE WHEN state = ? THEN updated_at ELSE ? END WHERE id = ?",
                       (JobState.SENDING.value, attempts, last_error, min(row[4] for row in pending),
                        JobState.SENDING.value, now, job_id))
            return JobState.SENDING
        if by_state[OutboxState.HELD]:  # only held rows remain open: the job waits for its reviewer
            db.execute("UPDATE jobs SET state = ?, attempts = ?, last_error = ?,"
                       " updated_at = CASE WHEN state = ? THEN updated_at ELSE ? END WHERE id = ?",
                       (JobState.REVIEW.value, attempts, last_error, JobState.REVIEW.value, now, job_id))
            return JobState.REVIEW
        reason = db.execute("SELECT reason FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] or ""
        reason = reason.split(_SEND_FAILED, 1)[0].split(_SENT_WITH_WARNING, 1)[0]
        if failed:
            state = JobState.FAILED
            reason += _SEND_FAILED + "; ".join(f"{row[0]} {row[1]}: {row[5]}" for row in failed)
        elif by_state[OutboxState.REJECTED]:
            state = JobState.REJECTED
        elif by_state[OutboxState.EXPIRED]:
            state = JobState.EXPIRED
        else:
            state = JobState.SENT
            warnings = [f"{row[6]} from {row[0]} ({row[1]})" for row in rows if row[6]]
            if warnings:
                reason += _SENT_WITH_WARNING + "; ".join(warnings)
        db.execute("UPDATE jobs SET state = ?, reason = ?, attempts = ?, last_error = ?, updated_at = ? WHERE id = ?",
                   (state.value, reason, attempts, last_error, now, job_id))
        return state

    def outbox_counts(self) -> dict[str, OutboxCounts]:
        """Per destination: its rows pending (of jobs still sending), sent, failed and
        held for a reviewer (of jobs in review or still sending)."""
        with self.db.lock:
            rows = self.db.connection.execute(
                """SELECT o.destination,
                          SUM(o.state = 'pending' AND j.state = 'sending'), SUM(o.state = 'sent'),
                          SUM(o.state = 'failed'), SUM(o.state = 'held' AND j.state IN ('review', 'sending'))
                   FROM outbox o JOIN jobs j ON j.id = o.job_id GROUP BY o.destination ORDER BY o.destination"""
            ).fetchall()
        return {name: OutboxCounts(int(p or 0), int(s or 0), int(f or 0), int(h or 0)) for name, p, s, f, h in rows}

    def update_job(self, job_id: int, state: JobState, update: JobUpdate = JobUpdate(), *,
                   expect: JobState | None = None, now: float | None = None) -> bool:
        """Move a job to ``state``, recording ``update``; with ``expect``, only if it is
        still in that state (a job superseded meanwhile keeps its state). True if the
        row changed."""
        with self.db.transaction() as db:
            return self._update(db, job_id, state, update, expect=expect, now=now)

    @staticmethod
    def _update(db: sqlite3.Connection, job_id: int, state: JobState, update: JobUpdate = JobUpdate(), *,
                expect: JobState | None = None, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        columns = {"state": state.value, "updated_at": now, **update.columns()}
        where, keys = "id = ?", [job_id]
        if expect is not None:
            where += " AND state = ?"
            keys.append(expect.value)
        sets = ", ".join(f"{column} = ?" for column in columns)
        return db.execute(f"UPDATE jobs SET {sets} WHERE {where}", (*columns.values(), *keys)).rowcount > 0

    def resume_interrupted(self, now: float | None = None) -> int:
        """Jobs that were ``processing`` when the node stopped run again."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                (JobState.RECEIVED.value, now, JobState.PROCESSING.value),
            ).rowcount

    def requeue(self, job_id: int, destination: str | None = None, now: float | None = None) -> Job:
        """Queue a failed job again: its failed outbox rows (only those for
        ``destination``, if named) are due now, else, when it made no result to send,
        its series is processed again. ``KeyError`` for an unknown job, ``ValueError``
        (with the reason) for one that cannot be retried."""
        now = time.time() if now is None else now
        job = self.job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        if job.state is not JobState.FAILED:
            raise ValueError(f"job {job_id} is {job.state.value}, only failed jobs can be retried")
        with self.db.transaction() as db:
            newer = db.execute("SELECT MAX(id) FROM jobs WHERE series_instance_uid = ? AND id > ?",
                               (job.series.series_instance_uid, job_id)).fetchone()[0]
            if newer is not None:
                raise ValueError(f"job {job_id} covers an older state of its series; job {newer} replaces it")
            if db.execute("SELECT purged FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]:
                raise ValueError(f"job {job_id}: its series and results were deleted by retention")
            rows = db.execute("SELECT destination, state, path FROM outbox WHERE job_id = ?", (job_id,)).fetchall()
            if destination is not None and destination not in {row[0] for row in rows}:
                raise ValueError(f"job {job_id} has nothing for destination {destination!r}")
            failed = [row for row in rows if row[1] == OutboxState.FAILED.value
                      and (destination is None or row[0] == destination)]
            if rows and not failed:
                raise ValueError(f"job {job_id} has no failed send" + (f" to {destination}" if destination else ""))
            if failed and any(not Path(row[2]).exists() for row in failed):
                raise ValueError(f"job {job_id}: its result files are gone ({failed[0][2]}); process it again"
                                 " (retry --reprocess)")
            if failed:
                db.execute(
                    "UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ? WHERE job_id = ? AND state = ?"
                    + ("" if destination is None else " AND destination = ?"),
                    (OutboxState.PENDING.value, now, job_id, OutboxState.FAILED.value,
                     *(() if destination is None else (destination,))),
                )
                reason = (job.reason or "").split(_SEND_FAILED, 1)[0]
                self._update(db, job_id, JobState.SENDING,
                             JobUpdate(reason=reason, attempts=job.attempts, next_attempt_at=now), now=now)
            else:
                self._update(db, job_id, JobState.RECEIVED, JobUpdate(attempts=0, next_attempt_at=now), now=now)
        return self.job(job_id)  # type: ignore[return-value]

    def reprocess(self, job_id: int, now: float | None = None, *, allow_partial: bool = False) -> Job:
        """Queue the instances of an ended job for a new processing run: a new job
        (``received``, ``reprocess_of`` the old one) over the same instances; the old job
        keeps its outcome. ``KeyError`` for an unknown job, ``ValueError`` (with the
        reason) for one that has not ended, whose series grew since or was deleted."""
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            row = db.execute(
                "SELECT series_instance_uid, state, upto_seq, purged, received_at, completed_at FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            uid, state, upto, purged, received_at, completed_at = row
            if JobState(state) not in _REPROCESSABLE:
                raise ValueError(f"job {job_id} is {state}; only ended jobs (sent, skipped, no_result, failed,"
                                 " rejected, expired) can be processed again")
            newer = db.execute("SELECT MAX(id) FROM jobs WHERE series_instance_uid = ? AND id > ?",
                               (uid, job_id)).fetchone()[0]
            if newer is not None:
                raise ValueError(f"job {job_id} is not the latest job of its series; process job {newer} again"
                                 " instead")
            if purged:
                raise ValueError(f"job {job_id}: its series was deleted by retention")
            cursor = db.execute(
                """INSERT INTO jobs (series_instance_uid, state, created_at, updated_at, upto_seq, received_at,
                                     completed_at, reprocess_of, reason, allow_partial)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (uid, JobState.RECEIVED.value, now, now, upto, received_at, completed_at, job_id,
                 f"queued again from job {job_id} (reprocess{', partial allowed' if allow_partial else ''})",
                 int(allow_partial)),
            )
            new_id = int(cursor.lastrowid)
        return self.job(new_id)  # type: ignore[return-value]

    def recent_sends(self, limit: int, destination: str | None = None) -> list[tuple[float, bool, str | None]]:
        """The last ``limit`` send attempts (to ``destination``, if named), newest first:
        (time, succeeded, error)."""
        where, params = ("", ()) if destination is None else (" WHERE destination = ?", (destination,))
        with self.db.lock:
            rows = self.db.connection.execute(
                f"SELECT at, ok, error FROM sends{where} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [(at, bool(ok), error) for at, ok, error in rows]


_OUTBOX_COLUMNS = """o.id, o.job_id, o.destination, o.object, o.path, o.state, o.attempts, o.next_attempt_at,
    o.last_error, o.warning, o.sent_at"""


def _open_series(db: sqlite3.Connection, series: SeriesRef, now: float) -> None:
    """The series' row, (re)opened for receiving, with ``now`` as its latest activity."""
    db.execute(
        """INSERT INTO series (series_instance_uid, study_instance_uid, calling_ae_title,
                               folder, first_received_at, last_received_at, receiving)
           VALUES (?, ?, ?, ?, ?, ?, 1)
           ON CONFLICT(series_instance_uid) DO UPDATE
           SET last_received_at = excluded.last_received_at, receiving = 1""",
        (series.series_instance_uid, series.study_instance_uid, series.calling_ae_title, str(series.folder),
         now, now),
    )


def _outbox_item(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=row["id"], job_id=row["job_id"], destination=row["destination"], object=row["object"],
        path=Path(row["path"]), state=OutboxState(row["state"]), attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"], last_error=row["last_error"], warning=row["warning"],
        sent_at=row["sent_at"],
    )


def _job(row: sqlite3.Row) -> Job:
    """A job from a row of ``_JOB_COLUMNS``, by column name."""
    values = {field.name: row[field.name] for field in fields(Job) if field.name != "series"}
    values["state"] = JobState(values["state"])
    values["result_path"] = Path(values["result_path"]) if values["result_path"] else None
    values["allow_partial"] = bool(values["allow_partial"])
    series = SeriesRef(row["study_instance_uid"], row["series_instance_uid"], row["calling_ae_title"],
                       Path(row["folder"]))
    return Job(series=series, **values)
