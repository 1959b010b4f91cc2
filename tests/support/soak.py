"""A hospital day compressed against a real node: the engine of ``bench/soak.py`` and of
``tests/test_soak.py``.

* **Traffic** (``plan_traffic``, ``Traffic``): series derived from the shared ones with
  new UIDs (about a third T1 to process; the rest a T2, a 3-plane localizer, a pCASL
  perfusion object with its raw data, a two-echo 4D series and a series in two
  orientations, which the node must skip or fail with a reason), sent by three
  concurrent senders: dcmtk ``storescu`` (one association per series, or one per
  instance), pynetdicom one association at a time (per series, or per instance), and
  pynetdicom splitting a series over several associations (at once, or one after
  another). A sender whose association fails or whose instance is refused (the node
  down, its disk full) sends the whole series again, as a PACS does.
* **Faults** (``Fault``, ``FaultRunner``): destination outages (the counting storescp
  stopped, then started again on its port) and ``kill -9`` of the node followed by a
  restart, each when a given share of the series has been sent.
* **Pressure**: the spool lies on a small tmpfs (``small_disk``), with
  ``storage.min_free_bytes`` and ``retention.pressure_free_bytes`` set so that the disk
  fills, C-STORE answers 0xA700 and retention deletes; retention periods of minutes.
* **Measures** (``Sampler``): the spool's and the database's bytes and the node's RSS,
  sampled in a background thread.
* **Invariants** (``check``): exactly one SEG reception per T1 series (counted per
  C-STORE at the destination), no partial SEG (one referencing fewer instances than its
  series has), every other series ended with a reason (``status --json``), the spool
  under the disk-pressure bound at the end; and the time from a series' last instance
  sent to its SEG's reception.

``run_soak`` runs all of it and returns a ``SoakReport``; ``format_report`` prints it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.derived import copy_series
from tests.support.dcmtk import STORESCU_CONFIG, StoreSCP
from tests.support.disk import small_disk
from tests.support.node import NodeProcess, node_config, node_settled
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_until

__all__ = [
    "Kind", "Sender", "Mode", "SeriesPlan", "plan_traffic", "derive_series", "SentSeries", "Traffic",
    "FaultKind", "Fault", "FaultEvent", "FaultRunner", "Sample", "Sampler", "SoakSettings", "Findings",
    "SoakReport", "check", "run_soak", "format_report",
]

NODE_AE = "DICOMNODE"
_MIB = 1 << 20


# -- what is sent -------------------------------------------------------------------------

class Kind(str, enum.Enum):
    """A kind of series in the day's traffic, and what the node must do with it."""

    T1 = "t1"  # t1_siemens_3t_fl2d_sag_hfs, 35 slices: processed, one SEG
    T1_LARGE = "t1_large"  # t1_philips_3t_mprage_sag, 170 slices: processed, one SEG
    T2 = "t2"  # t2_siemens_3t_tse_ax_adi: skipped by policy
    LOCALIZER = "localizer"  # hard_localizer_ge_3plane_phantom: not one volume
    PERFUSION = "perfusion"  # hard_enhanced_philips_pcasl_source_plus_raw: 4D perfusion plus raw data
    FOUR_D = "four_d"  # the fl2d T1 as two echoes at every position
    MULTI_ORIENTATION = "multi_orientation"  # the fl2d T1 with a third of its slices turned coronal

    @property
    def processed(self) -> bool:
        return self in (Kind.T1, Kind.T1_LARGE)


_SOURCES = {
    Kind.T1: "t1_siemens_3t_fl2d_sag_hfs",
    Kind.T1_LARGE: "t1_philips_3t_mprage_sag",
    Kind.T2: "t2_siemens_3t_tse_ax_adi",
    Kind.LOCALIZER: "hard_localizer_ge_3plane_phantom",
    Kind.PERFUSION: "hard_enhanced_philips_pcasl_source_plus_raw",
    Kind.FOUR_D: "t1_siemens_3t_fl2d_sag_hfs",
    Kind.MULTI_ORIENTATION: "t1_siemens_3t_fl2d_sag_hfs",
}
_SKIPPED_KINDS = (Kind.T2, Kind.LOCALIZER, Kind.PERFUSION, Kind.FOUR_D, Kind.MULTI_ORIENTATION)


class Sender(str, enum.Enum):
    """The three concurrent senders, each with its calling AE title."""

    DCMTK = "DCMTK_SCU"  # dcmtk storescu
    PYNETDICOM = "PYNET_SCU"  # pynetdicom, one association at a time
    PYNETDICOM_SPLIT = "PYNET_SPLIT"  # pynetdicom, a series over several associations


class Mode(str, enum.Enum):
    """How a sender spreads one series over associations."""

    PER_SERIES = "per_series"  # one association for the series
    PER_INSTANCE = "per_instance"  # one association per instance
    SPLIT_CONCURRENT = "split_concurrent"  # three associations at once, a third each
    SPLIT_SEQUENTIAL = "split_sequential"  # two associations one after the other, a half each


_MODES = {
    Sender.DCMTK: (Mode.PER_SERIES, Mode.PER_INSTANCE),
    Sender.PYNETDICOM: (Mode.PER_INSTANCE, Mode.PER_SERIES),
    Sender.PYNETDICOM_SPLIT: (Mode.SPLIT_CONCURRENT, Mode.SPLIT_SEQUENTIAL),
}


@dataclass(frozen=True)
class SeriesPlan:
    """One series of the day: its number, kind, sender and mode."""

    index: int
    kind: Kind
    sender: Sender
    mode: Mode

    @property
    def name(self) -> str:
        return f"{self.index:04d}_{self.kind.value}"


def plan_traffic(count: int, *, seed: int = 24, large_t1_every: int = 0) -> list[SeriesPlan]:
    """``count`` series, a third of them T1 (every ``large_t1_every``-th T1 the 170-slice
    one; 0: none), the rest the skipped kinds in turn; shuffled with ``seed``, dealt to
    the senders in turn, each sender alternating its modes."""
    t1_count = (count + 2) // 3
    kinds = [Kind.T1_LARGE if large_t1_every and (n + 1) % large_t1_every == 0 else Kind.T1
             for n in range(t1_count)]
    kinds += [_SKIPPED_KINDS[n % len(_SKIPPED_KINDS)] for n in range(count - t1_count)]
    random.Random(seed).shuffle(kinds)
    senders = list(Sender)
    plans = []
    for index, kind in enumerate(kinds):
        sender = senders[index % len(senders)]
        modes = _MODES[sender]
        plans.append(SeriesPlan(index, kind, sender, modes[(index // len(senders)) % len(modes)]))
    return plans


def derive_series(plan: SeriesPlan, data_dir: Path, out_dir: Path, seed: str) -> list[Path]:
    """The files of one planned series, with new Study, Series, Frame of Reference and SOP
    Instance UIDs (derived from ``seed`` and the series' number)."""
    source = data_dir / _SOURCES[plan.kind]
    entropy = f"{seed}-{plan.index}"
    if plan.kind is Kind.FOUR_D:
        return _two_echoes(source, out_dir, entropy)
    paths = copy_series(source, out_dir, entropy)
    if plan.kind is Kind.MULTI_ORIENTATION:
        for path in paths[-len(paths) // 3:]:  # a third of the slices turned coronal
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.save_as(path, enforce_file_format=True)
    return paths


def _two_echoes(source: Path, out_dir: Path, entropy: str) -> list[Path]:
    """The series as two echoes at every position, in one series (a 4D series)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = (generate_uid(entropy_srcs=[entropy, what]) for what in ("study", "series", "frame"))
    paths = []
    for index, path in enumerate(sorted(source.glob("*.dcm"))):
        for echo in (1, 2):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[entropy, path.name, str(echo)])
            ds.EchoNumbers = echo
            ds.EchoTime = float(ds.EchoTime) * echo
            ds.InstanceNumber = index + 1 + 1000 * (echo - 1)
            target = out_dir / f"echo{echo}_{index:03d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            paths.append(target)
    return paths


# -- the senders --------------------------------------------------------------------------

class SendFailed(Exception):
    """An attempt to send a series did not store every instance."""


def _storescu(port: int, files: list[Path], calling: str) -> None:
    result = subprocess.run(
        ["storescu", "-v", "-xf", str(STORESCU_CONFIG), "Default", "-aet", calling, "-aec", NODE_AE, LOCALHOST,
         str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    stored = len(re.findall(r"Received Store Response \((Success|Warning)", output))
    if result.returncode != 0 or stored != len(files):
        refused = sorted(set(re.findall(r"Received Store Response \(([^)]*)\)", output)) - {"Success"})
        raise SendFailed(f"storescu exit {result.returncode}, {stored}/{len(files)} stored"
                         + (f", answers {refused}" if refused else ""))


def _contexts(files: list[Path]) -> set[tuple[str, str]]:
    contexts = set()
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    return contexts


def _pynetdicom(port: int, files: list[Path], calling: str) -> None:
    """Every file over one pynetdicom association, each answered with success or warning."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in sorted(_contexts(files)):
        ae.add_requested_context(sop_class, syntax)
    began = time.monotonic()
    assoc = ae.associate(LOCALHOST, port, ae_title=NODE_AE)
    if not assoc.is_established:
        raise SendFailed(f"association not established after {time.monotonic() - began:.0f} s (rejected,"
                         " aborted or nobody listening)")
    try:
        for path in files:
            began = time.monotonic()
            try:
                status = assoc.send_c_store(path)
            except Exception as exc:  # the peer went away mid-association
                raise SendFailed(f"C-STORE raised {type(exc).__name__}: {exc}") from exc
            code = status.get("Status") if status else None
            if code is None or not (code == 0 or 0xB000 <= code <= 0xBFFF):
                raise SendFailed(f"no answer after {time.monotonic() - began:.0f} s (association lost)"
                                 if code is None else f"answered 0x{code:04X}")
        assoc.release()
    finally:
        if assoc.is_alive():
            assoc.abort()


def _split(files: list[Path], parts: int) -> list[list[Path]]:
    size = -(-len(files) // parts)
    return [files[start:start + size] for start in range(0, len(files), size)]


def send_series(port: int, files: list[Path], sender: Sender, mode: Mode) -> None:
    """One attempt to send the whole series the way ``sender`` and ``mode`` say."""
    calling = sender.value
    if mode is Mode.SPLIT_CONCURRENT:
        problems: list[str] = []

        def part(chunk: list[Path]) -> None:
            try:
                _pynetdicom(port, chunk, calling)
            except Exception as exc:  # collected, raised below for the whole series
                problems.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=part, args=(chunk,)) for chunk in _split(files, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if problems:
            raise SendFailed("; ".join(problems))
        return
    if mode is Mode.SPLIT_SEQUENTIAL:
        for chunk in _split(files, 2):
            _pynetdicom(port, chunk, calling)
        return
    chunks = [[path] for path in files] if mode is Mode.PER_INSTANCE else [files]
    for chunk in chunks:
        if sender is Sender.DCMTK:
            _storescu(port, chunk, calling)
        else:
            _pynetdicom(port, chunk, calling)


@dataclass
class SentSeries:
    """What a sender did with one planned series."""

    plan: SeriesPlan
    series_instance_uid: str
    sop_instance_uids: frozenset[str]
    attempts: int = 0
    delivered: bool = False
    last_sent_at: float | None = None  # when the last instance of the last attempt was answered
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pace:
    """How the senders pace themselves: ``spread_seconds`` over the day (0: back to back),
    a failed attempt again after ``retry_seconds``, up to ``max_attempts``."""

    spread_seconds: float = 0
    retry_seconds: float = 2.0
    max_attempts: int = 60
    keep_files: bool = False


class Traffic:
    """The three senders as threads, each sending its series in order; a series goes no
    earlier than its slot (``spread_seconds`` over the day; 0: back to back). A failed
    attempt is retried after ``retry_seconds``, up to ``max_attempts``."""

    def __init__(self, plans: list[SeriesPlan], port: Callable[[], int], data_dir: Path, folder: Path, *,
                 seed: str, pace: Pace = Pace()) -> None:
        self.plans, self.port, self.data_dir, self.folder, self.seed = plans, port, data_dir, folder, seed
        self.pace = pace
        self.sent: dict[int, SentSeries] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(sender,), name=f"send-{sender.value}", daemon=True)
                         for sender in Sender]
        self.started_at = 0.0

    def start(self) -> Traffic:
        self.started_at = time.time()
        for thread in self._threads:
            thread.start()
        return self

    def done(self) -> int:
        """Series whose sending has ended (delivered or given up)."""
        with self._lock:
            return sum(1 for sent in self.sent.values() if sent.delivered or sent.attempts >= self.pace.max_attempts)

    def progress(self) -> float:
        return self.done() / len(self.plans) if self.plans else 1.0

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        self._stop.set()

    def _run(self, sender: Sender) -> None:
        try:
            for plan in (p for p in self.plans if p.sender is sender):
                slot = self.started_at + self.pace.spread_seconds * plan.index / max(len(self.plans), 1)
                if self._stop.wait(max(0.0, slot - time.time())):
                    return
                self._send_one(plan)
                if self._stop.is_set():
                    return
        except Exception:  # a bug in the harness: reported, not swallowed
            self.errors.append(f"sender {sender.value}: {traceback.format_exc()}")

    def _send_one(self, plan: SeriesPlan) -> None:
        folder = self.folder / plan.name
        files = derive_series(plan, self.data_dir, folder, self.seed)
        headers = [pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
                   for path in files]
        sent = SentSeries(plan, str(headers[0].SeriesInstanceUID), frozenset(str(h.SOPInstanceUID) for h in headers))
        with self._lock:
            self.sent[plan.index] = sent
        while sent.attempts < self.pace.max_attempts and not self._stop.is_set():
            with self._lock:
                sent.attempts += 1
            try:
                send_series(self.port(), files, plan.sender, plan.mode)
            except Exception as exc:  # refused, node down, association lost: send it all again
                sent.failures.append(f"{time.time():.1f} {type(exc).__name__}: {exc}")
                self._stop.wait(self.pace.retry_seconds)
                continue
            with self._lock:
                sent.last_sent_at = time.time()
                sent.delivered = True
            break
        if not self.pace.keep_files:
            for path in files:
                path.unlink(missing_ok=True)
            folder.rmdir()


# -- the faults ---------------------------------------------------------------------------

class FaultKind(str, enum.Enum):
    OUTAGE = "destination outage"  # the counting storescp stopped, then started on its port
    KILL = "kill -9 of the node, then a restart"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    at: float  # when this share of the series has been sent
    seconds: float = 0.0  # how long an outage lasts


@dataclass
class FaultEvent:
    fault: Fault
    started_at: float
    ended_at: float
    detail: str = ""


class FaultRunner:
    """Applies each fault once the traffic has reached its share, in order."""

    def __init__(self, faults: list[Fault], traffic: Traffic, node: NodeProcess, destination: StoreSCP) -> None:
        self.faults = sorted(faults, key=lambda f: f.at)
        self.traffic = traffic
        self.node = node
        self.destination = destination
        self.events: list[FaultEvent] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> FaultRunner:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            for fault in self.faults:
                while self.traffic.progress() < fault.at:
                    if self._stop.wait(0.2):
                        return
                started = time.time()
                if fault.kind is FaultKind.OUTAGE:
                    self.destination.stop()
                    self._stop.wait(fault.seconds)
                    self.destination.start()
                    detail = f"storescp down {time.time() - started:.1f} s, back on port {self.destination.port}"
                else:
                    code = self.node.stop(signal.SIGKILL)
                    self.node.start()
                    detail = f"node exit {code}, listening again after {time.time() - started:.1f} s"
                self.events.append(FaultEvent(fault, started, time.time(), detail))
        except Exception:  # reported with the run, not swallowed
            self.errors.append(traceback.format_exc())


# -- the measures ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    at: float
    spool_bytes: int
    database_bytes: int
    node_rss_bytes: int  # the serve process
    total_rss_bytes: int  # the serve process and its children (the model process)


def folder_bytes(folder: Path) -> int:
    """Bytes in the files under ``folder``, as far as they are still there (retention
    deletes while this counts)."""
    sizes = []
    for path in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                sizes.append(path.stat().st_size)
    return sum(sizes)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children = [int(child) for child in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


class Sampler:
    """Samples the spool's and the database's bytes and the node's RSS every ``interval`` s."""

    def __init__(self, node: NodeProcess, interval: float = 1.0) -> None:
        self.node = node
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    @property
    def spool(self) -> Path:
        return Path(self.node.config["storage"]["spool_dir"])

    @property
    def database(self) -> Path:
        return Path(self.node.config["storage"]["state_db"])

    def sample(self) -> Sample:
        process = self.node.process
        pid = process.pid if process is not None else None
        database = sum(path.stat().st_size for path in self.database.parent.glob(self.database.name + "*")
                       if path.is_file())
        node_rss = _rss(pid) if pid else 0
        total = node_rss + sum(_rss(child) for child in _descendants(pid)) if pid else 0
        return Sample(time.time(), folder_bytes(self.spool), database, node_rss, total)

    def start(self) -> Sampler:
        self.samples.append(self.sample())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.samples.append(self.sample())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.sample())


# -- the run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoakSettings:
    """One soak run. Periods in minutes; disk sizes in MiB."""

    series: int = 300
    spread_minutes: float = 0.0  # the day's series spread over this long (0: back to back)
    faults: tuple[Fault, ...] = (
        Fault(FaultKind.OUTAGE, 0.25, 20.0),
        Fault(FaultKind.KILL, 0.5),
        Fault(FaultKind.OUTAGE, 0.75, 20.0),
    )
    large_t1_every: int = 0  # every n-th T1 the 170-slice Philips MPRAGE (0: none)
    seed: int = 24
    stable_seconds: float = 6.0
    incomplete_grace_seconds: float = 20.0
    spool_megabytes: int = 256  # the tmpfs under the spool
    min_free_megabytes: int = 32  # storage.min_free_bytes: C-STORE answers 0xA700 below it
    pressure_free_megabytes: int = 96  # retention.pressure_free_bytes: the first ended go first below it
    sent_minutes: float = 3.0  # retention.days
    skipped_minutes: float = 1.0  # retention.skipped_days
    failed_minutes: float = 3.0  # retention.failed_days
    retention_interval_seconds: float = 2.0
    send_max_attempts: int = 30
    sender_retry_seconds: float = 2.0
    settle_seconds: float | None = None  # how long the end may take after the last series is sent

    def retention(self) -> dict:
        """The retention keys, as far as this node's config has them."""
        from dicom_node.config import RetentionSettings

        day = 1440.0
        wanted = {"days": self.sent_minutes / day, "skipped_days": self.skipped_minutes / day,
                  "failed_days": self.failed_minutes / day, "interval_seconds": self.retention_interval_seconds,
                  "pressure_free_bytes": self.pressure_free_megabytes * _MIB}
        return {key: value for key, value in wanted.items() if key in RetentionSettings.model_fields}


@dataclass
class Findings:
    """The invariants, with what broke them."""

    t1_series: int
    t1_with_one_seg: list[str]  # series UIDs with exactly one SEG reception
    t1_seg_counts: dict[str, int]  # T1 series UID -> SEG receptions, where not exactly one
    partial_segs: list[str]  # "file: referenced n of m" for each SEG referencing fewer instances than its series
    stray_segs: list[str]  # SEGs whose source is not a T1 series of the day
    others: list[tuple[SentSeries, str, str]]  # each other series: (sent, its last job's state, reason)
    others_not_ended: list[str]  # other series without an ended job with a reason
    undelivered: list[str]  # series the senders gave up on
    latencies: list[float]  # last instance sent -> its SEG's reception, seconds

    @property
    def ok(self) -> bool:
        return (len(self.t1_with_one_seg) == self.t1_series and not self.partial_segs and not self.stray_segs
                and not self.others_not_ended and not self.undelivered)


@dataclass
class SoakReport:
    settings: SoakSettings
    started_at: float
    sending_seconds: float  # first series to the last one sent
    total_seconds: float  # start to settled
    settled: bool  # every job ended and no series still receiving, within the settings' time
    findings: Findings
    samples: list[Sample]
    faults: list[FaultEvent]
    healthz: tuple[int, dict]
    spool_end_bytes: int
    spool_bound_bytes: int  # the disk-pressure bound: the tmpfs minus retention.pressure_free_bytes
    log_counts: dict[str, int]  # refusals, retention deletions, restarts, from the node's log
    harness_errors: list[str]
    sent: list[SentSeries]


_ENDED = {"sent", "skipped", "failed", "no_result"}


def _jobs_json(node: NodeProcess) -> list[dict]:
    result = node.cli("status", "--json")
    if result.returncode != 0:
        raise RuntimeError(f"status --json exited {result.returncode}: {result.stderr[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _reception_time(scp: StoreSCP, path: Path) -> float:
    return (scp.done / path.name).stat().st_mtime


def check(sent: list[SentSeries], destination: StoreSCP, jobs: list[dict]) -> Findings:
    """The invariants over what the senders sent, what the destination received (every
    C-STORE, a duplicate counts) and the node's jobs (``status --json``)."""
    destination.settle()
    by_series = {s.series_instance_uid: s for s in sent}
    segs: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in destination.receptions():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("Modality") != "SEG":
            continue
        referenced = ds.get("ReferencedSeriesSequence")
        source = str(referenced[0].SeriesInstanceUID) if referenced else "-"
        segs.setdefault(source, []).append((path, ds))

    t1 = [s for s in sent if s.plan.kind.processed]
    one = [s.series_instance_uid for s in t1 if len(segs.get(s.series_instance_uid, [])) == 1]
    counts = {s.series_instance_uid: len(segs.get(s.series_instance_uid, [])) for s in t1
              if len(segs.get(s.series_instance_uid, [])) != 1}
    partial, stray, latencies = [], [], []
    for source, received in segs.items():
        series = by_series.get(source)
        if series is None or not series.plan.kind.processed:
            stray += [f"{path.name}: source series {source}" for path, _ in received]
            continue
        for path, ds in received:
            refs = {str(item.ReferencedSOPInstanceUID)
                    for item in ds.ReferencedSeriesSequence[0].get("ReferencedInstanceSequence", [])}
            if not series.sop_instance_uids <= refs:
                partial.append(f"{path.name} ({series.plan.name}): references {len(refs & series.sop_instance_uids)}"
                               f" of {len(series.sop_instance_uids)} instances")
        if len(received) == 1 and series.last_sent_at is not None:
            latencies.append(_reception_time(destination, received[0][0]) - series.last_sent_at)

    last_job: dict[str, dict] = {}
    for job in sorted(jobs, key=lambda j: j["id"]):
        if job["state"] != "superseded":
            last_job[job["series_instance_uid"]] = job
    others, not_ended = [], []
    for series in (s for s in sent if not s.plan.kind.processed):
        job = last_job.get(series.series_instance_uid)
        state, reason = (job["state"], job["reason"] or "") if job else ("(no job)", "")
        others.append((series, state, reason))
        if state not in _ENDED - {"sent"} or not reason.strip():
            not_ended.append(f"{series.plan.name} {series.series_instance_uid}: {state}: {reason or '(no reason)'}")
    undelivered = [f"{s.plan.name} after {s.attempts} attempt(s): {s.failures[-1] if s.failures else ''}"
                   for s in sent if not s.delivered]
    return Findings(len(t1), one, counts, partial, stray, others, not_ended, undelivered, latencies)


def _healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/healthz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON body
        return exc.code, json.loads(exc.read())


def _log_counts(log: str) -> dict[str, int]:
    return {
        "C-STORE refused 0xA700 (out of resources)": len(re.findall(r"refused with 0xA700", log)),
        "retention deletions by period": log.count("retention (period): deleted series"),
        "retention deletions under disk pressure": log.count("retention (pressure): deleted series"),
    }


def _waited(predicate: Callable[[], object], timeout: float, interval: float, what: str,
            progress: Callable[[str], None]) -> bool:
    """``wait_until``, with a timeout reported (the findings then show what is missing)."""
    try:
        wait_until(predicate, timeout, interval, what)
    except TimeoutError as exc:
        progress(f"TIMEOUT: {exc}")
        return False
    return True


def soak_config(folder: Path, spool: Path, destination: StoreSCP, weights: Path, settings: SoakSettings) -> dict:
    """The node's config for a soak: ``node_config`` with the spool on ``spool`` and the
    soak's completion, send, retention and http keys."""
    callers = [{"ae_title": sender.value, "host": LOCALHOST} for sender in Sender]
    return node_config(
        folder, destination=(destination.ae_title, destination.port), weights_dir=weights,
        security={"allowed_callers": callers},
        storage={"spool_dir": str(spool), "min_free_bytes": settings.min_free_megabytes * _MIB},
        completion={"stable_seconds": settings.stable_seconds, "complete_on_release": True,
                    "incomplete_grace_seconds": settings.incomplete_grace_seconds},
        send={"max_attempts": settings.send_max_attempts, "retry_delay_seconds": 1, "timeout_seconds": 10},
        retention=settings.retention(),
        http={"port": free_port()},
    )


@dataclass
class _Run:
    """What run_soak started, for the clean-up."""

    destination: StoreSCP | None = None
    node: NodeProcess | None = None
    traffic: Traffic | None = None
    faults: FaultRunner | None = None
    sampler: Sampler | None = None


def _stop_all(run: _Run) -> None:
    for part in (run.traffic, run.faults):
        if part is not None:
            part.stop()
    if run.sampler is not None and run.sampler._thread.is_alive():
        run.sampler.stop()
    if run.node is not None and run.node.process is not None:
        run.node.stop(signal.SIGKILL)
    if run.destination is not None:
        run.destination.stop()


@contextlib.contextmanager
def _quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom logs every association and C-STORE at INFO: thousands of lines a run."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_soak(workdir: Path, data_dir: Path, weights: Path, settings: SoakSettings,
             progress: Callable[[str], None] = lambda line: None) -> SoakReport:
    """The whole soak in ``workdir`` (its spool on a tmpfs mounted there); ``progress``
    gets a line now and then."""
    run = _Run()
    started = time.time()
    with small_disk(workdir / "spool", settings.spool_megabytes) as spool, _quiet_pynetdicom():
        try:
            return _soak(run, workdir, spool, data_dir, weights, settings, progress, started)
        finally:
            _stop_all(run)


def _soak(run: _Run, workdir: Path, spool: Path, data_dir: Path, weights: Path, settings: SoakSettings,
          progress: Callable[[str], None], started: float) -> SoakReport:
    run.destination = StoreSCP(workdir / "pacs").start()
    config = soak_config(workdir / "node", spool, run.destination, weights, settings)
    run.node = node = NodeProcess(workdir / "node", config).start()
    run.sampler = Sampler(node).start()
    plans = plan_traffic(settings.series, seed=settings.seed, large_t1_every=settings.large_t1_every)
    run.traffic = traffic = Traffic(plans, lambda: node.port, data_dir, workdir / "sources",
                                    seed=f"soak{settings.seed}", pace=Pace(settings.spread_minutes * 60,
                                                                           settings.sender_retry_seconds))
    run.faults = faults = FaultRunner(list(settings.faults), traffic, node, run.destination)
    traffic.start()
    faults.start()
    progress(f"sending {len(plans)} series ({sum(p.kind.processed for p in plans)} T1) from three senders")

    last_report = time.monotonic()
    while not traffic.join(5):
        if time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            progress(f"{traffic.done()}/{len(plans)} series sent, {len(faults.events)} fault(s) so far,"
                     f" {len(run.destination.receptions())} object(s) at the destination")
    sending_seconds = time.time() - traffic.started_at
    faults.join(max(f.seconds for f in settings.faults) + 120 if settings.faults else 1)
    progress(f"all series sent after {sending_seconds:.0f} s; waiting for the node to settle")

    t1_count = sum(p.kind.processed for p in plans)
    settle = settings.settle_seconds or 180 + 40 * t1_count
    settled = _waited(lambda: node.process is not None and node_settled(node, len(plans)), settle, 1,
                      "every job to end and no series still receiving", progress)
    total_seconds = time.time() - started
    bound = (settings.spool_megabytes - settings.pressure_free_megabytes) * _MIB
    # disk pressure keeps retention.pressure_free_bytes free once the jobs have ended
    _waited(lambda: folder_bytes(spool) <= bound, 10 * settings.retention_interval_seconds + 30, 0.5,
            "the spool under the disk-pressure bound", progress)
    jobs = _jobs_json(node)
    healthz = _healthz(node.config["http"]["port"])
    run.sampler.stop()
    findings = check(list(traffic.sent.values()), run.destination, jobs)
    return SoakReport(
        settings=settings, started_at=started, sending_seconds=sending_seconds, total_seconds=total_seconds,
        settled=settled,
        findings=findings, samples=run.sampler.samples, faults=faults.events, healthz=healthz,
        spool_end_bytes=folder_bytes(spool), spool_bound_bytes=bound, log_counts=_log_counts(node.log()),
        harness_errors=traffic.errors + faults.errors, sent=sorted(traffic.sent.values(), key=lambda s: s.plan.index),
    )


# -- the printout ---------------------------------------------------------------------------

def _mib(value: float) -> str:
    return f"{value / _MIB:.1f} MiB"


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(share * 100) - 1]


def format_report(report: SoakReport) -> Iterator[str]:
    """The soak's figures, line by line."""
    findings, settings = report.findings, report.settings
    sent = report.sent
    yield (f"soak: {len(sent)} series ({findings.t1_series} T1, {len(findings.others)} to skip) from three"
           f" senders in {report.sending_seconds:.0f} s, settled after {report.total_seconds:.0f} s")
    senders = Counter((s.plan.sender.value, s.plan.mode.value) for s in sent)
    yield "  senders: " + ", ".join(f"{sender} {mode} {n}" for (sender, mode), n in sorted(senders.items()))
    resent = [s for s in sent if s.attempts > 1]
    yield f"  series sent more than once (a failure, then the whole series again): {len(resent)}"
    failures = Counter((s.plan.sender.value, re.sub(r"(?<!after )\b\d+\b", "N", failure.split(" ", 1)[1]))
                       for s in sent for failure in s.failures)
    for (sender, failure), count in sorted(failures.items()):
        yield f"    {count:4d} x {sender}: {failure}"
    for event in report.faults:
        yield (f"  fault at {event.started_at - report.started_at:.0f} s: {event.fault.kind.value}"
               f" ({event.detail})")
    if not report.settled:
        yield "NOT SETTLED: jobs still open or series still receiving when the run gave up waiting"
    yield f"T1 series with exactly one SEG reception: {len(findings.t1_with_one_seg)} of {findings.t1_series}"
    for uid, count in findings.t1_seg_counts.items():
        yield f"  NOT ONE: series {uid}: {count} SEG reception(s)"
    yield f"partial SEGs: {len(findings.partial_segs)}"
    for line in findings.partial_segs:
        yield f"  PARTIAL: {line}"
    if findings.stray_segs:
        yield f"SEGs for series that are not T1: {len(findings.stray_segs)}"
        for line in findings.stray_segs:
            yield f"  {line}"
    if findings.undelivered:
        yield f"series the senders gave up on: {len(findings.undelivered)}"
        for line in findings.undelivered:
            yield f"  {line}"
    yield f"series to skip (their last job's state and reason, from status --json): {len(findings.others)}"
    for series, state, reason in findings.others:
        yield f"  {series.plan.name} ({series.plan.sender.value} {series.plan.mode.value}): {state}: {reason}"
    reasons = Counter((series.plan.kind.value, state, reason) for series, state, reason in findings.others)
    yield "  by kind and reason:"
    for (kind, state, reason), count in sorted(reasons.items()):
        yield f"    {count:4d} x {kind}: {state}: {reason}"
    for line in findings.others_not_ended:
        yield f"  NOT ENDED WITH A REASON: {line}"
    samples = report.samples
    for name, attribute in (("spool", "spool_bytes"), ("database", "database_bytes"),
                            ("node RSS (serve process)", "node_rss_bytes"),
                            ("node RSS with its model process", "total_rss_bytes")):
        values = [getattr(sample, attribute) for sample in samples]
        yield (f"{name}: start {_mib(values[0])}, peak {_mib(max(values))}, end {_mib(values[-1])}"
               f" ({len(values)} samples)")
    yield (f"spool at the end: {_mib(report.spool_end_bytes)}, bound {_mib(report.spool_bound_bytes)} (a"
           f" {settings.spool_megabytes} MiB tmpfs less retention.pressure_free_bytes"
           f" {settings.pressure_free_megabytes} MiB)")
    for name, count in report.log_counts.items():
        yield f"{name}: {count}"
    if findings.latencies:
        yield (f"last instance sent -> SEG received: p50 {_percentile(findings.latencies, 0.5):.1f} s,"
               f" p95 {_percentile(findings.latencies, 0.95):.1f} s (n={len(findings.latencies)};"
               f" includes completion.stable_seconds {settings.stable_seconds:g} s for series not known whole)")
    status, body = report.healthz
    yield f"/healthz at the end: {status} {json.dumps(body)}"
    for error in report.harness_errors:
        yield f"HARNESS ERROR: {error}"
