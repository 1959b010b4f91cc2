"""Ingest benchmark: series sent with dcmtk storescu to the node, to dcmtk storescp and to
Orthanc, in one run: one association of one series, and several concurrent associations
of a series each; prints instances per second for each (the median of the runs) and the
node's ratios.

    .venv/bin/python bench/ingest.py [--series DIR] [--repeat N] [--associations N] [--before REV]
    .venv/bin/python bench/ingest.py --profile   # where the node's C-STORE time goes

Every peer listens on 127.0.0.1 only. Every run sends copies of the series with new UIDs
(the same copies to each peer), so no peer is sent an instance it already holds (Orthanc
would answer an instance it has without writing it). The runs go round the peers in turn,
so that a change in the machine's load falls on all of them. The node runs as
``dicom-node serve`` with an empty weights folder and a long completion timer, so it
starts no job. storescp runs with ``--fork`` (a process per association) and writes
without fsync; Orthanc with its defaults (``SyncStorageArea``: each file fsynced).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.derived import copy_series  # noqa: E402
from tests.support.dcmtk import STORESCU_CONFIG, loopback_env  # noqa: E402
from tests.support.node import NodeProcess, node_config  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.paths import LOCALHOST, data_dir, free_port  # noqa: E402
from tests.support.wait import wait_for_port  # noqa: E402

PEERS = ("dicom-node", "Orthanc", "dcmtk storescp")
REPO = Path(__file__).resolve().parent.parent


def _node(folder: Path, port: int, source: Path | None = None) -> NodeProcess:
    """``dicom-node serve`` that starts no job; ``source``: a folder holding another
    revision's ``dicom_node`` and ``pipeline``, imported before this checkout's."""
    config = node_config(folder, destination=("NOBODY", free_port()), weights_dir=folder / "none")
    config["node"]["port"] = port
    config["completion"] = {"stable_seconds": 600, "complete_on_release": False}
    before = os.environ.get("PYTHONPATH")
    if source is not None:
        os.environ["PYTHONPATH"] = str(source)
    try:
        return NodeProcess(folder, config).start()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def _revision(rev: str, folder: Path) -> Path:
    """``dicom_node`` and ``pipeline`` as they were at git revision ``rev``, in ``folder``."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "dicom_node", "pipeline"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _send(port: int, called: str, series: list[list[Path]]) -> float:
    """Instances per second of one storescu association per series, all at once."""
    start = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-xf", str(STORESCU_CONFIG), "Default", "-aet", "MODALITY",
                                 "-aec", called, LOCALHOST, str(port), *map(str, files)],
                                env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
               for files in series]
    for sender in senders:
        _, err = sender.communicate(timeout=600)
        if sender.returncode != 0 or err.strip():
            raise RuntimeError(f"storescu to {called} failed ({sender.returncode}): {err.decode()[-2000:]}")
    return sum(map(len, series)) / (time.perf_counter() - start)


def _storescp(folder: Path, port: int) -> subprocess.Popen:
    """Plain storescp: a process per association, a file per instance, no fsync."""
    folder.mkdir(parents=True)
    process = subprocess.Popen(["storescp", "--fork", "-aet", "PACS", "-od", str(folder), "+uf", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=loopback_env())
    wait_for_port(port, process=process)
    return process


def _table(results: dict[str, dict[str, list[float]]], modes: dict[str, int], peers: list[str]) -> str:
    old = [peer for peer in peers if peer.startswith("dicom-node ")]
    lines = ["| associations | " + " | ".join(f"{peer} inst/s" for peer in peers)
             + " | node / Orthanc | node / storescp |" + "".join(f" node / {peer} |" for peer in old),
             "|---|" + "---:|" * (len(peers) + 2 + len(old))]
    for mode in modes:
        medians = {peer: statistics.median(results[mode][peer]) for peer in peers}
        cells = [f"{medians[peer]:.1f} ({', '.join(f'{r:.0f}' for r in results[mode][peer])})" for peer in peers]
        lines.append(f"| {mode} | " + " | ".join(cells)
                     + f" | {medians['dicom-node'] / medians['Orthanc']:.2f}"
                     + f" | {medians['dicom-node'] / medians['dcmtk storescp']:.2f} |"
                     + "".join(f" {medians['dicom-node'] / medians[peer]:.2f} |" for peer in old))
    return "\n".join(lines)


class _Timers:
    """Seconds spent in each wrapped step, summed over all threads."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, owner: object, attr: str, name: str) -> None:
        """Time every call of ``owner.attr`` as ``name`` (a property: its getter)."""
        import functools

        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        getter = original.fget if isinstance(original, property) else original

        @functools.wraps(getter)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return getter(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        setattr(owner, attr, property(timed) if isinstance(original, property) else timed)


class _TimedLock:
    """The state store's lock, timing how long callers wait for it."""

    def __init__(self, lock, timers: _Timers) -> None:
        self._lock, self._timers = lock, timers

    def __enter__(self):
        start = time.perf_counter()
        self._lock.acquire()
        self._timers.add("db lock wait", time.perf_counter() - start)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __getattr__(self, name: str):
        return getattr(self._lock, name)


class _TimedConnection:
    """The state store's connection, timing its statements (``COMMIT`` on its own)."""

    def __init__(self, connection, timers: _Timers) -> None:
        self._connection, self._timers = connection, timers

    def execute(self, sql: str, *args):
        start = time.perf_counter()
        try:
            return self._connection.execute(sql, *args)
        finally:
            word = sql.split(None, 1)[0].upper()
            self._timers.add("sqlite COMMIT (fsync of the WAL)" if word == "COMMIT" else "sqlite statements",
                             time.perf_counter() - start)

    def __getattr__(self, name: str):
        return getattr(self._connection, name)


def profile(series: Path, associations: int) -> int:
    """Run the node's storage SCP in this process, its steps wrapped in timers, and send
    the series over one association, then over ``associations`` at once; print the
    milliseconds per instance of each step (summed over threads) against the wall time."""
    import shutil

    from pynetdicom import evt

    from dicom_node.config import parse_config
    from dicom_node.metrics import Metrics
    from dicom_node.receive import intake, scp
    from dicom_node.receive.completion import Completion
    from dicom_node.store import spool as spool_module
    from dicom_node.store.state import StateStore

    timers = _Timers()
    timers.wrap(scp.StorageSCP, "_handle_store", "handler, in all")
    timers.wrap(evt.Event, "dataset", "decode (event.dataset, in full)")
    timers.wrap(evt.Event, "encoded_dataset", "encoded_dataset()")
    for module in (scp, intake):
        for attr, name in (("placement_of", "placement"), ("instance_problem", "checks (pixel data)"),
                           ("validate_uid", "UID checks"), ("read_header", "decode (the elements read only)")):
            if attr in module.__dict__:
                timers.wrap(module, attr, name)
    timers.wrap(shutil, "disk_usage", "free-space check")
    timers.wrap(StateStore, "instance_count", "series size check")
    timers.wrap(StateStore, "record_instance", "record_instance, in all")
    timers.wrap(spool_module.Spool, "store_instance", "spool write, in all")
    timers.wrap(spool_module, "_fsync_dir", "fsync of the folder")
    timers.wrap(os, "fsync", "fsync (every caller in Python)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = parse_config({
            "node": {"port": free_port(), "bind_address": LOCALHOST},
            "security": {"allowed_callers": [{"ae_title": "MODALITY", "host": LOCALHOST}]},
            "destination": {"ae_title": "PACS", "host": LOCALHOST, "port": 104},
            "completion": {"stable_seconds": 600, "complete_on_release": False},
        }, work)
        state = StateStore(work / "state.sqlite3")
        state.db.lock = _TimedLock(state.db.lock, timers)
        state.db.connection = _TimedConnection(state.db.connection, timers)
        server = scp.StorageSCP(config.node, config.security, config.storage, spool_module.Spool(work / "spool"),
                                state, Completion(config.completion, state, lambda job: None), Metrics(state))
        server.start()
        try:
            for count in (1, associations):
                copies = [copy_series(series, work / "copies" / f"{count}-{index}", f"profile-{count}-{index}")
                          for index in range(count)]
                timers.seconds.clear()
                timers.calls.clear()
                cpu = os.times()
                rate = _send(config.node.port, config.node.ae_title, copies)
                used = os.times()
                instances = sum(map(len, copies))
                print(f"\n{count} association(s), {instances} instances: {rate:.1f} instances/s,"
                      f" {1000 / rate:.2f} ms wall per instance; node process CPU"
                      f" {1000 * (used.user + used.system - cpu.user - cpu.system) / instances:.2f} ms per instance")
                print("| step | ms per instance | calls |")
                print("|---|---:|---:|")
                for name, seconds in sorted(timers.seconds.items(), key=lambda item: -item[1]):
                    print(f"| {name} | {1000 * seconds / instances:.2f} | {timers.calls[name]} |")
        finally:
            server.stop()
            state.close()
    return 0


def main() -> int:
    default = data_dir() / "t1_philips_3t_mprage_sag"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=default)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--associations", type=int, default=4, help="concurrent associations, a series each")
    parser.add_argument("--before", metavar="REV",
                        help="also run the node of git revision REV (its dicom_node and pipeline) in the rotation")
    parser.add_argument("--profile", action="store_true",
                        help="time the steps of the node's C-STORE path instead (the node in this process)")
    args = parser.parse_args()
    if not sorted(args.series.glob("*.dcm")):
        print(f"no .dcm files in {args.series}", file=sys.stderr)
        return 2
    if args.profile:
        return profile(args.series, args.associations)

    modes = {"1": 1, str(args.associations): args.associations}
    peers = [*PEERS[:1], *([f"dicom-node {args.before}"] if args.before else []), *PEERS[1:]]
    results: dict[str, dict[str, list[float]]] = {mode: {peer: [] for peer in peers} for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copies = {(run, mode): [copy_series(args.series, work / "copies" / f"{run}-{mode}-{index}",
                                            f"ingest-{run}-{mode}-{index}") for index in range(count)]
                  for run in range(args.repeat) for mode, count in modes.items()}
        node_port = free_port()
        orthanc = Orthanc(work / "orthanc", node_port=node_port).start()
        storescp_port = free_port()
        storescp = _storescp(work / "storescp", storescp_port)
        nodes = {"dicom-node": _node(work / "node", node_port)}
        if args.before:
            nodes[peers[1]] = _node(work / "node-before", free_port(), _revision(args.before, work / "before"))
        ports = {**{name: (node.port, "DICOMNODE") for name, node in nodes.items()},
                 "Orthanc": (orthanc.dicom_port, orthanc.ae_title), "dcmtk storescp": (storescp_port, "PACS")}
        try:
            for run in range(args.repeat):
                for mode in modes:
                    for peer in peers:
                        results[mode][peer].append(_send(*ports[peer], copies[run, mode]))
            expected = sum(len(files) for series in copies.values() for files in series)
            for name, node in nodes.items():
                stored = sqlite3.connect(node.config["storage"]["state_db"]).execute("SELECT COUNT(*) FROM instances")
                if (count := stored.fetchone()[0]) != expected:
                    raise RuntimeError(f"{name} recorded {count} instances, {expected} were sent")
        finally:
            for node in nodes.values():
                node.stop()
            storescp.terminate()
            storescp.wait(timeout=10)
            orthanc.stop()

    size = len(sorted(args.series.glob("*.dcm")))
    print(f"series: {args.series.name} ({size} instances) per association; instances per second,"
          f" median of {args.repeat} runs (each run in brackets)")
    print(_table(results, modes, peers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
