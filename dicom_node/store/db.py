"""The SQLite connection the state store shares between threads, and its transactions.

One connection, opened in WAL mode with ``synchronous=FULL`` (a committed row survives a
power cut) and foreign keys on; rows come back as ``sqlite3.Row``, read by column name.
Every write goes through ``transaction()``: ``BEGIN IMMEDIATE`` under the store's lock,
``COMMIT`` on success, ``ROLLBACK`` on an error, and a ``ROLLBACK`` too when the
``COMMIT`` itself fails (a full disk, an I/O error), so the shared connection is never
left inside a transaction. A transaction refused because the database or its disk is
full (``SQLITE_FULL``) is remembered (``full_at``, ``full_error``) for readiness.

``grouped()`` is a group commit: writes that arrive while another commit is under way
wait and then go together into one transaction (each in its own savepoint, so that one
that fails leaves the others in), with one ``COMMIT`` and so one fsync of the WAL for all
of them; each caller still returns only once its own write is committed (or raises what
failed it). The first waiting caller runs the commit (no thread of its own).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Database", "is_full", "cannot_write"]


@dataclass
class _Write:
    """One caller's write waiting for a group commit."""

    work: Callable[[sqlite3.Connection], None]
    done: bool = False
    error: BaseException | None = None


class Database:
    """One SQLite connection, a lock, and transactions that always end."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.RLock()
        self.connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.connection.row_factory = sqlite3.Row
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.full_at: float | None = None  # when a transaction last failed with SQLITE_FULL
        self.full_error: str | None = None
        self._group = threading.Condition()  # guards the writes waiting for a group commit
        self._waiting: list[_Write] = []
        self._committing = False  # a caller is running a group commit

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back when it raises
        or when the commit fails."""
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield self.connection
            except BaseException as exc:
                self._note_full(exc)
                self._rollback()
                raise
            try:
                self.connection.execute("COMMIT")
            except BaseException as exc:
                self._note_full(exc)
                self._rollback()
                raise

    def grouped(self, work: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``work`` in a transaction shared with the writes waiting beside it, and
        return once that transaction is committed; raise what failed ``work`` or the
        commit."""
        write = _Write(work)
        with self._group:
            self._waiting.append(write)
            while self._committing and not write.done:
                self._group.wait()
            if not write.done:  # nobody is committing: this caller commits what waits
                self._committing = True
                batch, self._waiting = self._waiting, []
        if not write.done:
            try:
                self._commit_group(batch)
            finally:
                with self._group:
                    self._committing = False
                    self._group.notify_all()
        if write.error is not None:
            raise write.error

    def _commit_group(self, batch: list[_Write]) -> None:
        """One transaction for ``batch``; every write in it marked done, with its error."""
        try:
            with self.transaction() as connection:
                if len(batch) == 1:  # alone: its failure is the transaction's
                    batch[0].work(connection)
                else:
                    for write in batch:
                        connection.execute("SAVEPOINT grouped")
                        try:
                            write.work(connection)
                        except Exception as exc:
                            self._note_full(exc)
                            connection.execute("ROLLBACK TO grouped")
                            write.error = exc
                        connection.execute("RELEASE grouped")
        except BaseException as exc:  # the transaction failed: nothing of it was committed
            for write in batch:
                write.error = write.error or exc
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._group:
                for write in batch:
                    write.done = True

    def _note_full(self, exc: BaseException) -> None:
        """Remember a write refused because the database or its disk is full."""
        if is_full(exc):
            self.full_at, self.full_error = time.time(), str(exc)

    def _rollback(self) -> None:
        if self.connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.connection.execute("ROLLBACK")

    def read(self, query: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Every row of a query, read under the lock."""
        with self.lock:
            return self.connection.execute(query, params).fetchall()

    def read_one(self, query: str, params: tuple = ()) -> sqlite3.Row | None:
        with self.lock:
            return self.connection.execute(query, params).fetchone()

    def executescript(self, script: str) -> None:
        with self.lock:
            self.connection.executescript(script)

    def close(self) -> None:
        with self.lock:
            self.connection.close()


def is_full(exc: BaseException) -> bool:
    """The database or its disk is full (SQLITE_FULL)."""
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def cannot_write(exc: BaseException) -> bool:
    """The database cannot take a write for want of room: full, or an I/O error (a full
    disk under the WAL file shows as one): out of resources, not a fault of the data."""
    code = getattr(exc, "sqlite_errorcode", None)
    return is_full(exc) or (isinstance(exc, sqlite3.OperationalError) and code is not None
                            and code & 0xFF == sqlite3.SQLITE_IOERR)
