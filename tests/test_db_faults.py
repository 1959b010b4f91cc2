"""The state store fails and comes back: after a send, while recording it, at COMMIT, and
on a full disk. Each send is received exactly once, and the node recovers without a
restart. (In-process node, the model faked; storescp, storescu and the disk are real.)
"""

from __future__ import annotations

import sqlite3
import threading

import pydicom
import pytest

from dicom_node.service import Node
from dicom_node.store.state import JobState
from tests.derived import copy_series
from tests.support.asserts import assert_exactly_one_seg
from tests.support.dcmtk import storescu
from tests.support.disk import fill_to, small_disk
from tests.support.inprocess import inprocess_node
from tests.support.wait import wait_until

pytestmark = pytest.mark.peers


class FaultyConnection:
    """The store's SQLite connection, failing on purpose: ``faults`` times, on a statement
    that ``when`` picks (given its text and whether the transaction recorded a send)."""

    def __init__(self, real: sqlite3.Connection, when, faults: int) -> None:
        self._real = real
        self._when = when
        self.faults = faults
        self.raised = 0
        self._send_in_transaction = False
        self._lock = threading.Lock()

    def execute(self, sql: str, *args):
        with self._lock:
            if "INSERT INTO sends" in sql:
                self._send_in_transaction = True
            fire = self.faults > 0 and self._when(sql, self._send_in_transaction)
            if sql in ("COMMIT", "ROLLBACK"):
                self._send_in_transaction = False
            if fire:
                self.faults -= 1
                self.raised += 1
        if fire:
            raise sqlite3.OperationalError("disk I/O error (injected by the test)")
        return self._real.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _node(tmp_path, storescp, **storage) -> Node:
    node = inprocess_node(tmp_path, storescp, storage=storage, send={"retry_delay_seconds": 1}, http={"port": 0})
    node.start()
    return node


def _series(mri_dir, tmp_path, name: str):
    files = copy_series(mri_dir / "t1_siemens_3t_fl2d_sag_hfs", tmp_path / name, seed=f"{tmp_path.name}-{name}")
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _sent(node: Node, series_uid: str) -> bool:
    return any(j.state is JobState.SENT for j in node.state.jobs() if j.series.series_instance_uid == series_uid)


FAULTS = {
    # the send went through, then recording its outcome fails (at the first statement)
    "after-the-send": lambda sql, send: sql.lstrip().startswith("UPDATE outbox SET state"),
    # recording fails half-way, after the attempt was logged: the transaction is rolled back
    "while-recording": lambda sql, send: sql.lstrip().startswith("DELETE FROM sends"),
    # every statement of the recording succeeds, its COMMIT fails
    "at-commit": lambda sql, send: sql == "COMMIT" and send,
}


@pytest.mark.parametrize("where", list(FAULTS))
def test_a_failing_state_store_never_sends_twice_and_recovers(tmp_path, storescp, mri_dir, where):
    node = _node(tmp_path, storescp)
    try:
        faulty = FaultyConnection(node.state.db.connection, FAULTS[where], faults=3)
        node.state.db.connection = faulty
        first, first_uid = _series(mri_dir, tmp_path, "first")
        storescu(node.config.node.port, first)
        wait_until(lambda: _sent(node, first_uid), 120, 0.2, "the first SEG recorded as sent")
        assert faulty.raised == 3, "the faults were met"
        assert_exactly_one_seg(storescp, first_uid)
        second, second_uid = _series(mri_dir, tmp_path, "second")  # and the node goes on
        storescu(node.config.node.port, second)
        wait_until(lambda: _sent(node, second_uid), 120, 0.2, "the second SEG sent")
        assert_exactly_one_seg(storescp, second_uid)
        assert node.queue.alive
    finally:
        node.stop()


def test_a_full_disk_under_the_database_refuses_then_recovers_without_a_restart(tmp_path, storescp, mri_dir):
    disk = tmp_path / "db-disk"
    with small_disk(disk, 24):
        node = _node(tmp_path, storescp, state_db=str(disk / "state.sqlite3"))
        try:
            files, series_uid = _series(mri_dir, tmp_path, "full")
            filler = fill_to(disk, 0)
            statuses = _store_statuses(node.config.node.port, files)
            assert any(status == 0xA700 for status in statuses), [hex(s) for s in statuses]
            filler.unlink()
            storescu(node.config.node.port, files)  # the sender tries again; the disk has room now
            wait_until(lambda: _sent(node, series_uid), 120, 0.2, "the SEG sent after the disk was freed")
            assert_exactly_one_seg(storescp, series_uid)
        finally:
            node.stop()


def _store_statuses(port: int, files) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(str(path)).Status) for path in files]
    finally:
        assoc.release()
