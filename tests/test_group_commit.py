"""What the C-STORE path shares between concurrent instances keeps each one's promise:
a folder's fsync serves only the renames made before it began, and a group commit
returns to each caller only once its own row is committed, a failing write alone."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from dicom_node.store import spool as spool_module
from dicom_node.store.db import Database
from dicom_node.store.spool import Spool
from tests.support.wait import wait_until


def test_a_folder_fsync_serves_only_the_renames_before_it(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    folder = spool.series_folder("1.2.3", "1.2.3.4")
    folder.mkdir(parents=True)
    started: list[threading.Event] = []
    release = threading.Event()
    real = spool_module._fsync_dir

    def fsync_dir(path: Path) -> None:  # the first fsync waits until the test lets it go
        started.append(threading.Event())
        if len(started) == 1:
            release.wait(10)
        real(path)

    monkeypatch.setattr(spool_module, "_fsync_dir", fsync_dir)
    done: list[str] = []

    def ask(name: str) -> None:
        spool.sync_folder(folder)
        done.append(name)

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    wait_until(lambda: started, 10, 0.01, "the first fsync")
    later = [threading.Thread(target=ask, args=(f"later-{n}",)) for n in range(3)]  # renamed after it began
    for thread in later:
        thread.start()
    wait_until(lambda: spool._syncs[folder].asked == 4, 10, 0.01, "the later callers")
    assert done == [], "nobody returns before an fsync that began after their rename"
    release.set()
    for thread in (first, *later):
        thread.join(10)
    assert sorted(done) == ["first", "later-0", "later-1", "later-2"]
    assert len(started) == 2, "the three later callers share one second fsync"
    assert spool._syncs == {}


def test_a_group_commit_commits_each_callers_row_and_fails_only_the_bad_one(tmp_path):
    db = Database(tmp_path / "state.db")
    db.executescript("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    gate = threading.Event()
    results: dict[int, str] = {}

    def hold(connection: sqlite3.Connection) -> None:  # the first commit holds the others back
        gate.wait(10)
        connection.execute("INSERT INTO t VALUES (0, 'first')")

    def write(key: int) -> None:
        value = None if key == 3 else f"v{key}"  # key 3 breaks NOT NULL
        try:
            db.grouped(lambda connection: connection.execute("INSERT INTO t VALUES (?, ?)", (key, value)))
            results[key] = "ok"
        except sqlite3.IntegrityError:
            results[key] = "failed"

    first = threading.Thread(target=db.grouped, args=(hold,))
    first.start()
    wait_until(lambda: db._committing, 10, 0.01, "the first commit")
    writers = [threading.Thread(target=write, args=(key,)) for key in range(1, 6)]
    for thread in writers:
        thread.start()
    wait_until(lambda: len(db._waiting) == 5, 10, 0.01, "five writes waiting")
    assert results == {}, "nobody returns before its own row is committed"
    gate.set()
    for thread in (first, *writers):
        thread.join(10)
    assert results == {1: "ok", 2: "ok", 3: "failed", 4: "ok", 5: "ok"}
    rows = {k for (k,) in db.read("SELECT k FROM t")}
    assert rows == {0, 1, 2, 4, 5}
    assert not db.connection.in_transaction


def test_a_failed_commit_fails_every_write_of_its_group(tmp_path):
    db = Database(tmp_path / "state.db")
    db.executescript("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    db.executescript("CREATE TABLE p (k INTEGER PRIMARY KEY)")
    db.connection.execute("PRAGMA foreign_keys=ON")
    db.executescript("CREATE TABLE c (k INTEGER REFERENCES p(k) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):  # a deferred constraint fails at COMMIT
        db.grouped(lambda connection: connection.execute("INSERT INTO c VALUES (7)"))
    assert db.read("SELECT * FROM c") == []
    assert not db.connection.in_transaction
    db.grouped(lambda connection: connection.execute("INSERT INTO t VALUES (1)"))
    assert [tuple(row) for row in db.read("SELECT k FROM t")] == [(1,)]
