"""The promise of the C-STORE path under concurrency and a crash: an instance answered
with Success is on disk and in the state store. The node is killed (SIGKILL) while four
associations store one 170-instance series; after the restart, every instance a sender
saw acknowledged must be in the spool (readable, the same SOP instance) and have its
``instances`` row."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pydicom
import pytest

from tests.derived import copy_series
from tests.support.dcmtk import acknowledged, start_storescu, storescu
from tests.support.node import NodeProcess, node_fixture
from tests.support.wait import wait_until

pytestmark = pytest.mark.peers

MPRAGE = "t1_philips_3t_mprage_sag"  # 170 slices
ASSOCIATIONS = 4
KILL_AT = 60  # instances recorded in the state store when the node is killed

# no job while the test looks: the series stays `receiving`
node = node_fixture(completion={"stable_seconds": 600, "complete_on_release": False})


def _rows(node: NodeProcess) -> dict[str, sqlite3.Row]:
    """The node's ``instances`` rows by SOP Instance UID, read beside the running node."""
    connection = sqlite3.connect(node.config["storage"]["state_db"], timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        return {row["sop_instance_uid"]: row
                for row in connection.execute("SELECT sop_instance_uid, series_instance_uid, path FROM instances")}
    except sqlite3.OperationalError:  # the schema is not there yet
        return {}
    finally:
        connection.close()


def _missing(node: NodeProcess, sops: dict[Path, str]) -> list[str]:
    """What is wrong with each acknowledged file's instance after the restart (empty: nothing)."""
    rows = _rows(node)
    spool = Path(node.config["storage"]["spool_dir"]) / "incoming"
    problems = []
    for sent, sop in sops.items():
        expected = spool / _study_series(sent) / f"{sop}.dcm"
        row = rows.get(sop)
        if row is None:
            problems.append(f"{sent.name}: no instances row")
        elif Path(row["path"]) != expected:
            problems.append(f"{sent.name}: recorded at {row['path']}, not {expected}")
        if not expected.is_file():
            problems.append(f"{sent.name}: no file in the spool")
            continue
        try:
            stored = pydicom.dcmread(expected)
        except Exception as exc:  # a torn file
            problems.append(f"{sent.name}: unreadable in the spool ({type(exc).__name__})")
            continue
        if stored.SOPInstanceUID != sop or stored.pixel_array.shape != (stored.Rows, stored.Columns):
            problems.append(f"{sent.name}: the spool holds another instance")
    return problems


def _study_series(path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    return Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID


def test_every_acknowledged_instance_survives_kill_9(node, mri_dir, tmp_path):
    files = copy_series(mri_dir / MPRAGE, tmp_path / "series", "durability")
    assert len(files) == 170
    sop_of = {path: pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files}
    node.start()
    # four associations at once into the same series, interleaved slices: every commit and
    # every series row update contends with the three others
    logs = [tmp_path / f"storescu-{index}.log" for index in range(ASSOCIATIONS)]
    senders = [start_storescu(node.port, files[index::ASSOCIATIONS], log)
               for index, log in enumerate(logs)]
    recorded = wait_until(lambda: (n := len(_rows(node))) >= KILL_AT and n, 120, 0.01,
                          f"{KILL_AT} instances recorded")
    node.stop(signal.SIGKILL)
    for sender in senders:
        sender.wait(timeout=60)
    acked = [path for log in logs for path in acknowledged(log.read_text(errors="replace"))]
    # the kill came partway: some instances answered, and not the whole series
    assert len(acked) >= KILL_AT // 2, f"only {len(acked)} acknowledged before the kill"
    assert len(acked) < len(files), "the kill came after the whole series was stored"
    assert all(sender.returncode != 0 for sender in senders), "a sender finished before the kill"
    assert len(set(acked)) == len(acked)

    node.start()
    problems = _missing(node, {path: sop_of[path] for path in acked})
    assert not problems, f"{len(problems)} of {len(acked)} acknowledged instances lost:\n" + "\n".join(problems)
    print(f"\n{recorded} recorded at the kill, {len(acked)} acknowledged, all kept")

    # the senders repeat the series, as a PACS does: the node ends with each instance once
    storescu(node.port, files)
    rows = _rows(node)
    assert set(rows) == set(sop_of.values())
    assert not _missing(node, sop_of)
