"""The state store's schema: its tables, the triggers that stamp a job's times, and the
migration of a database of an earlier release (new tables, new columns with defaults,
triggers created again), run on every open.
"""

from __future__ import annotations

from dicom_node.store.db import Database

__all__ = ["migrate"]

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
    received_at         REAL NOT NULL,
    seq                 INTEGER NOT NULL DEFAULT 0,
    placement           TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_by_seq ON instances(seq);
CREATE INDEX IF NOT EXISTS instances_by_series_seq ON instances(series_instance_uid, seq);  -- a series' newest
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
    updated_at          REAL NOT NULL,
    upto_seq            INTEGER NOT NULL DEFAULT 0,
    seg_series_uid      TEXT,
    last_error          TEXT,
    received_at         REAL,
    completed_at        REAL,
    processing_at       REAL,
    processed_at        REAL,
    sent_at             REAL,
    reprocess_of        INTEGER,
    model_run           TEXT,
    routing             TEXT,
    model_outcomes      TEXT,
    allow_partial       INTEGER NOT NULL DEFAULT 0,
    queued_at           REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_by_upto ON jobs(upto_seq);  -- the next receive sequence number
CREATE TABLE IF NOT EXISTS sends (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              INTEGER NOT NULL,
    at                  REAL NOT NULL,
    ok                  INTEGER NOT NULL,
    error               TEXT,
    destination         TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              INTEGER NOT NULL REFERENCES jobs(id),
    destination         TEXT NOT NULL,
    object              TEXT NOT NULL,
    path                TEXT NOT NULL,
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    last_error          TEXT,
    warning             TEXT,
    series_uid          TEXT,
    sent_at             REAL,
    UNIQUE (job_id, destination, object)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS reviews (  -- a job's objects held for a reviewer (review: required), and the decision
    job_id              INTEGER PRIMARY KEY REFERENCES jobs(id),
    held_at             REAL NOT NULL,
    decision            TEXT,  -- approved, rejected, expired; NULL while waiting
    decided_at          REAL,
    reviewer            TEXT,
    reason              TEXT
);
CREATE TABLE IF NOT EXISTS refusals (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    status              INTEGER NOT NULL,
    reason              TEXT NOT NULL,
    at                  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_by_series ON refusals(series_instance_uid);
CREATE TABLE IF NOT EXISTS pulls (  -- dicom-node pull: each series a pull found, and how far it got
    pull_key            TEXT NOT NULL,  -- the pull's source and filters: the same arguments resume it
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    source              TEXT NOT NULL,
    config_digest       TEXT NOT NULL,  -- models, rules, destinations and pipeline as the series was pulled
    state               TEXT NOT NULL,  -- found, skipped, retrieving, completed, failed
    reason              TEXT,
    instances           INTEGER NOT NULL DEFAULT 0,
    job_id              INTEGER,
    found_at            REAL NOT NULL,
    updated_at          REAL NOT NULL,
    PRIMARY KEY (pull_key, series_instance_uid)
);
CREATE INDEX IF NOT EXISTS pulls_by_series ON pulls(series_instance_uid, state);
CREATE INDEX IF NOT EXISTS pulls_by_state ON pulls(state);  -- completion asks on every tick which series a pull holds
CREATE TABLE IF NOT EXISTS pull_runs (  -- a pull as started (CLI or status page) and whether it ended
    pull_key            TEXT PRIMARY KEY,
    arguments           TEXT NOT NULL,  -- JSON: source, filters, reprocess
    started_by          TEXT NOT NULL,  -- cli, page
    state               TEXT NOT NULL,  -- running, ended, failed
    reason              TEXT,
    started_at          REAL NOT NULL,
    updated_at          REAL NOT NULL
);
"""

# The timestamps, kept by the database on every write (see the module docstring).
# Dropped and created again on open, so that a change here reaches old databases too.
_DROPPED_TRIGGERS = ("jobs_log_send",)  # triggers of earlier releases
_TRIGGERS = {
    "jobs_stamp_created": """AFTER INSERT ON jobs BEGIN
        UPDATE jobs SET
            queued_at = COALESCE(NEW.queued_at, NEW.created_at),
            completed_at = COALESCE(NEW.completed_at, NEW.created_at),
            received_at = COALESCE(NEW.received_at,
                (SELECT MIN(i.received_at) FROM instances i
                 WHERE i.series_instance_uid = NEW.series_instance_uid AND i.seq <= NEW.upto_seq
                   AND i.seq > (SELECT COALESCE(MAX(o.upto_seq), 0) FROM jobs o
                                WHERE o.series_instance_uid = NEW.series_instance_uid AND o.id < NEW.id)),
                (SELECT first_received_at FROM series WHERE series_instance_uid = NEW.series_instance_uid))
        WHERE id = NEW.id;
    END""",
    "jobs_stamp_queued": """AFTER UPDATE OF state ON jobs
        WHEN NEW.state = 'received' AND OLD.state IS NOT 'received' BEGIN
        UPDATE jobs SET queued_at = NEW.updated_at WHERE id = NEW.id;
    END""",
    "jobs_stamp_processing": """AFTER UPDATE OF state ON jobs
        WHEN NEW.state = 'processing' AND OLD.state IS NOT 'processing' BEGIN
        UPDATE jobs SET processing_at = NEW.updated_at, processed_at = NULL, sent_at = NULL WHERE id = NEW.id;
    END""",
    "jobs_stamp_processed": """AFTER UPDATE OF state ON jobs
        WHEN OLD.state = 'processing' AND NEW.state IN ('sending', 'sent', 'no_result', 'skipped', 'failed') BEGIN
        UPDATE jobs SET processed_at = NEW.updated_at WHERE id = NEW.id;
    END""",
    "jobs_stamp_sent": """AFTER UPDATE OF state ON jobs
        WHEN NEW.state = 'sent' AND OLD.state IS NOT 'sent' BEGIN
        UPDATE jobs SET sent_at = NEW.updated_at WHERE id = NEW.id;
    END""",
}

# Columns added since the first release: (table, column, declaration). A database from
# an earlier release gets them on open; old rows get the defaults (an old job's
# ``upto_seq`` of 0 is completed below from its series' instances).
_ADDED_COLUMNS = (
    ("instances", "seq", "INTEGER NOT NULL DEFAULT 0"),
    ("instances", "placement", "TEXT"),
    ("jobs", "upto_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "seg_series_uid", "TEXT"),
    ("jobs", "last_error", "TEXT"),
    ("jobs", "received_at", "REAL"),
    ("jobs", "completed_at", "REAL"),
    ("jobs", "processing_at", "REAL"),
    ("jobs", "processed_at", "REAL"),
    ("jobs", "sent_at", "REAL"),
    ("jobs", "reprocess_of", "INTEGER"),
    ("jobs", "model_run", "TEXT"),
    ("jobs", "routing", "TEXT"),
    ("jobs", "model_outcomes", "TEXT"),
    ("jobs", "allow_partial", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "queued_at", "REAL"),
    ("sends", "destination", "TEXT"),
    ("outbox", "series_uid", "TEXT"),
)


def migrate(db: Database) -> None:
    """Create the schema, or bring a database of an earlier release up to it."""
    with db.transaction() as connection:
        for table, column, declaration in _ADDED_COLUMNS:
            existing = {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}
            if existing and column not in existing:
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    db.executescript(_SCHEMA)
    with db.transaction() as connection:
        for name in _DROPPED_TRIGGERS:
            connection.execute(f"DROP TRIGGER IF EXISTS {name}")
        for name, body in _TRIGGERS.items():
            connection.execute(f"DROP TRIGGER IF EXISTS {name}")
            connection.execute(f"CREATE TRIGGER {name} {body}")
        # rows of an earlier release: number the instances, give old jobs their whole series
        unnumbered = connection.execute(
            "SELECT rowid FROM instances WHERE seq = 0 ORDER BY received_at, rowid").fetchall()
        if unnumbered:
            start = connection.execute("SELECT COALESCE(MAX(seq), 0) FROM instances").fetchone()[0]
            connection.executemany("UPDATE instances SET seq = ? WHERE rowid = ?",
                                   [(start + n, row[0]) for n, row in enumerate(unnumbered, start=1)])
        connection.execute(
            """UPDATE jobs SET upto_seq = (SELECT COALESCE(MAX(i.seq), 0) FROM instances i
                                           WHERE i.series_instance_uid = jobs.series_instance_uid)
               WHERE upto_seq = 0"""
        )
