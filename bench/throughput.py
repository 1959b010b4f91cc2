"""Throughput benchmark: series per minute and overhead per series (wall time minus the
network's forward pass) for five ways of running the model, on the same series, in one run,
and where each series' time goes on the warm runner.

    .venv/bin/python bench/throughput.py [--series NAME|DIR[,NAME|DIR...]] [--count N]
                                         [--device cpu|gpu] [--weights DIR] [--paths a,b,c,d,e]
                                         [--repeat N] [--no-tta] [--step-size S] [--compile]

    # the issue's batch: three T1 series, the warm runner against TotalSegmentator's API
    .venv/bin/python bench/throughput.py --count 1 --paths b,e \
        --series t1_siemens_3t_fl2d_sag_hfs,t1_philips_3t_mprage_sag,hard_j2k_lossless_t1_fl2d_sag_hfdl_derived

(a) cold: a fresh spawned process per series running TotalSegmentator's own, unchanged
    ``totalsegmentator()`` (``pipeline.model.runner.run_model_on_nifti`` with
    ``pipeline.model.totalseg.run_in_child``), the node's former path;
(b) warm: the embedded warm runner, one ``ModelRunner`` for all series;
(c) celery: two ``dicom-node worker`` processes over a ``redis-server`` on 127.0.0.1,
    two series in flight (``CeleryModels`` from two threads);
(d) totalseg: TotalSegmentator's own DICOM path, ``totalsegmentator(input=DICOM_DIR,
    output=OUT, task="total", fast=True, output_type="dicom_seg")`` in a fresh spawned
    process per series, as its command line would run it (the command line itself cannot
    be used: on MR input it silently swaps ``total`` for ``total_mr``);
(e) totalseg-api: the same call for every series in turn in one spawned Python process
    (its imports paid once), as a script calling TotalSegmentator's API would run a batch.

For (b), a table of the parts of each series, from the job's own timing
(``SegResult.timing``, the model process's ``RunReport``): read, preprocess (Equation 1),
nnU-Net's preprocessing, the forward pass, nnU-Net's export, the back-end's own steps
(TotalSegmentator's reorientation and resampling), the hand-over (the image's way to the
model process and back, the wait for a starting process), encode and the total; then the
batch totals of (b) and (e) from the first series' start (the model process's start
included) to the last one's end, and their ratio. The goals: each warm series (after the
first) at most 1.5 times its forward pass plus its read and encode, and (e)/(b) at least 4
(bar: 3.5). ``--repeat N`` runs the chosen paths N times in turn (on a shared machine
the load changes from minute to minute) and prints each repetition's ratio and their
median; the tables show each path's run of median batch time.

(a) to (c) run the node's pipeline, ``pipeline.process.process_series``: read the DICOM
series, invert it (Equation 1), segment, encode the SEG (in memory). (d) reads the raw
series (no inversion: the same grid, so the same network work; fine for timing) and
writes its SEG to disk. All use the same weights (default: the phantom model).

The forward pass is ``RunReport.forward_seconds``, measured in the model process around
nnU-Net's prediction of each case (its preprocessing, sliding window and export). The
cold processes of (a) and (d) run TotalSegmentator's code unmodified, where it cannot be
measured; they are given (b)'s median on the same series, and the output says so.
Series per minute counts from the first series' start to the last one's end, so the
first series' model load is in it; "peak MiB" is the largest sum of proportional set
sizes of this process and all its children (model processes, workers, Redis), sampled
from /proc.

Everything is written under one temporary folder (``TMPDIR`` for the children too),
removed at the end; nothing is written into the repository or the shared data. Redis and
the workers are stopped at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The project is imported where it is used, not here: every spawned model process runs
# this file again as its main module, and should pay for nothing it does not need.
if TYPE_CHECKING:
    from pipeline.input.volume import Volume
    from pipeline.model.types import LabelMap
    from pipeline.process import SegResult
    from pipeline.settings import ModelSettings, PipelineSettings

DEFAULT_SERIES = "t1_philips_3t_mprage_sag"
DEFAULT_WEIGHTS = REPO / "models" / "phantom_total_fast"
LOCALHOST = "127.0.0.1"
WORKERS = 2

TITLES = {
    "a": "(a) cold process per series",
    "b": "(b) warm runner (embedded)",
    "c": f"(c) {WORKERS} Celery workers",
    "d": "(d) TotalSegmentator DICOM->SEG",
    "e": "(e) TotalSegmentator API, one process",
}
# the parts of a warm series, as SegResult.timing names them, and their columns
PARTS = (("load", "load"), ("read", "read"), ("preprocess", "preprocess"), ("nnunet_preprocess", "nnU-Net preprocess"),
         ("forward", "forward"), ("export", "export"), ("model_other", "resample etc."), ("handover", "hand-over"),
         ("encode", "encode"))


class PathUnavailable(Exception):
    """A path cannot run on this machine (a missing program or package); the others go on."""


@dataclass(frozen=True)
class SeriesRun:
    """One series through one path."""

    wall_seconds: float
    forward_seconds: float | None = None  # None: not measurable on this path
    loads: int | None = None  # the model process's load counter after this series
    worker: str | None = None  # which model process ran it
    series: str = ""  # the series folder's name
    slices: int = 0  # its instance files
    parts: dict[str, float] = field(default_factory=dict)  # SegResult.timing (the node's paths)


@dataclass
class PathResult:
    """All series of one path."""

    key: str
    runs: list[SeriesRun] = field(default_factory=list)
    elapsed_seconds: float = 0.0  # first series' start to last series' end
    cpu_seconds: float | None = None  # CPU time of this process and its ended children during the path
    loads: int | None = None
    peak_bytes: int | None = None
    forward_from: str | None = None  # where the forward time comes from when not measured here
    forward_estimate: float | None = None
    gpu_per_worker: bool = False  # (c): each worker pinned to a GPU of its own
    unavailable: str | None = None  # why the path did not run

    @property
    def wall(self) -> float:
        return statistics.median(run.wall_seconds for run in self.runs)

    @property
    def per_minute(self) -> float:
        return 60.0 * len(self.runs) / self.elapsed_seconds

    @property
    def forward(self) -> float | None:
        measured = [run.forward_seconds for run in self.runs if run.forward_seconds is not None]
        return statistics.median(measured) if measured else self.forward_estimate

    @property
    def overhead(self) -> float | None:
        return None if self.forward is None else max(self.wall - self.forward, 0.0)


@dataclass(frozen=True)
class Bench:
    """What every path shares."""

    series: list[Path]  # N copies of one DICOM series folder, under the temporary folder
    work: Path  # the temporary folder
    settings: PipelineSettings
    device: str

    @property
    def model(self) -> ModelSettings:
        return self.settings.model


# --- helpers ---------------------------------------------------------------------------

def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file())


def _check_seg(result: SegResult, folder: Path) -> None:
    from pipeline.process import Outcome

    if result.outcome is not Outcome.SEG:
        raise RuntimeError(f"{folder.name}: no SEG ({result.outcome.value}: {result.reason})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.1)


def _log_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


class MemorySampler:
    """Peak memory of this process and all its descendants, sampled from /proc: the sum of
    their proportional set sizes (PSS: a page shared by k processes counts 1/k in each, so
    torch's libraries, loaded by every model process, count once), else of their RSS."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-sampler", daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __enter__(self) -> "MemorySampler":
        if Path("/proc/self/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = sum(self._memory(pid) for pid in self._tree())
            self.peak_bytes = max(self.peak_bytes or 0, total)
            self._stop.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue  # ended meanwhile
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
        tree, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def _memory(self, pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
        try:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return 0  # ended meanwhile


# --- (a) one cold process per series -----------------------------------------------------

class ColdSegmenter:
    """A ``Segmenter`` that runs TotalSegmentator's unchanged ``totalsegmentator()`` in a
    fresh spawned process per volume (the node's path before the warm runner)."""

    def __init__(self, settings: ModelSettings) -> None:
        from pipeline.model.totalseg import TotalSegmentator

        self.settings = settings
        self.model = TotalSegmentator(settings)

    def describe(self) -> str:
        return f"{self.model.describe()} (cold process)"

    def segment(self, volume: Volume) -> LabelMap:
        from pipeline.input.nifti import nifti_to_array, volume_to_nifti
        from pipeline.model.identity import describe_model
        from pipeline.model.runner import run_model_on_nifti
        from pipeline.model.totalseg import run_in_child
        from pipeline.model.types import LabelMap

        self.model.check_weights()
        labels = run_model_on_nifti(volume_to_nifti(volume), run_in_child, self.settings, "TotalSegmentator")
        return LabelMap(array=nifti_to_array(labels, volume), names=self.model.names(), volume=volume,
                        model=describe_model(self.settings))


def run_cold(bench: Bench) -> PathResult:
    from pipeline.process import process_series

    segmenter = ColdSegmenter(bench.model)
    result = PathResult("a", loads=len(bench.series))  # one load per process, by construction
    start = time.perf_counter()
    for folder in bench.series:
        began = time.perf_counter()
        _check_seg(process_series(_files(folder), bench.settings, segmenter), folder)
        result.runs.append(SeriesRun(time.perf_counter() - began))
    result.elapsed_seconds = time.perf_counter() - start
    return result


# --- (b) the embedded warm runner ---------------------------------------------------------

def run_warm(bench: Bench) -> PathResult:
    from pipeline.model.runner import ModelRunner
    from pipeline.model.segment import make_segmenter
    from pipeline.process import process_series

    result = PathResult("b")
    start = time.perf_counter()  # the model process's start is part of the batch
    with ModelRunner(bench.model) as runner:
        segmenter = make_segmenter(bench.model, runner)
        for folder in bench.series:
            began = time.perf_counter()
            files = _files(folder)
            outcome = process_series(files, bench.settings, segmenter)
            _check_seg(outcome, folder)
            report = outcome.model_report
            result.runs.append(SeriesRun(time.perf_counter() - began, report.forward_seconds, report.loads,
                                         report.worker, _series_name(folder), len(files), outcome.timing))
        result.elapsed_seconds = time.perf_counter() - start
        result.loads = runner.loads
    return result


# --- (c) Celery workers over Redis ---------------------------------------------------------

def _gpu_count() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _stop(processes: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM to all (Celery: a warm shutdown), then SIGKILL to those still there after ``timeout``."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """redis-server on 127.0.0.1 and a free port, without persistence."""
    if shutil.which("redis-server") is None:
        raise PathUnavailable("redis-server is not installed (Debian package redis-server)")
    folder.mkdir(parents=True)
    port = _free_port()
    log_path = folder / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["redis-server", "--bind", LOCALHOST, "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(lambda: process.poll() is not None or _log_has(log_path, "Ready to accept connections"),
                  30, "redis-server")
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {log_path.read_text(errors='replace')[-2000:]}")
    except BaseException:
        _stop([process], 10)
        raise
    return process, f"redis://{LOCALHOST}:{port}/0"


def _worker_config(bench: Bench, folder: Path, broker_url: str) -> dict:
    return {
        "destination": {"ae_title": "UNUSED", "host": LOCALHOST, "port": 1},  # workers never send
        "pipeline": {"model": {"weights_dir": str(bench.model.weights_dir), "home_dir": str(folder / "totalseg"),
                               "device": bench.device}},
        "workers": {"backend": "celery", "broker_url": broker_url, "max_in_flight": WORKERS},
        "http": {"port": 0},
        "logging": {"level": "INFO"},
    }


def _start_worker(bench: Bench, folder: Path, broker_url: str, name: str, gpu: int | None) -> subprocess.Popen:
    """``dicom-node worker`` (ready: once its log says so); pinned to one GPU when given."""
    folder.mkdir(parents=True)
    config = folder / "worker.yaml"
    config.write_text(json.dumps(_worker_config(bench, folder, broker_url), indent=2))  # JSON is YAML
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with open(folder / "worker.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker", "--config", str(config), "--name", f"{name}@localhost"],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
        )


@contextmanager
def celery_workers(bench: Bench, folder: Path) -> Iterator[tuple[str, bool]]:
    """Redis and ``WORKERS`` workers, stopped on the way out whatever happens; yields the
    broker URL and whether each worker has its own GPU."""
    redis, broker_url = _start_redis(folder / "redis")
    gpus = _gpu_count() if bench.device == "gpu" else 0
    own_gpu = gpus >= WORKERS
    workers: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        for n in range(WORKERS):
            name = f"w{n + 1}"
            workers.append((name, _start_worker(bench, folder / name, broker_url, name, n if own_gpu else None),
                            folder / name / "worker.log"))
        for name, process, log_path in workers:
            _wait_for(lambda: process.poll() is not None or _log_has(log_path, f"{name}@localhost ready."),
                      180, f"worker {name}")
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited: {log_path.read_text(errors='replace')[-2000:]}")
        yield broker_url, own_gpu
        grace = 30.0  # a warm shutdown: the workers are idle now
    except BaseException:
        grace = 5.0  # a worker may still be computing a series nobody waits for
        raise
    finally:
        _stop([process for _, process, _ in workers], grace)
        _stop([redis], 10)


def run_celery(bench: Bench) -> PathResult:
    for package in ("celery", "redis"):
        if importlib.util.find_spec(package) is None:
            raise PathUnavailable(f"the package {package} is not installed in this environment")
    from dicom_node.config import WorkerSettings
    from dicom_node.remote.client import CeleryModels
    from pipeline.model.segment import make_segmenter
    from pipeline.process import process_series

    result = PathResult("c")
    with celery_workers(bench, bench.work / "celery") as (broker_url, own_gpu):
        service = CeleryModels(bench.model, WorkerSettings(backend="celery", broker_url=broker_url,
                                                           max_in_flight=WORKERS))
        segmenter = make_segmenter(bench.model, service)

        def one(folder: Path) -> SeriesRun:
            began = time.perf_counter()
            outcome = process_series(_files(folder), bench.settings, segmenter)
            _check_seg(outcome, folder)
            report = outcome.model_report
            return SeriesRun(time.perf_counter() - began, report.forward_seconds, report.loads, report.worker)

        pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="series")
        futures: list = []
        try:
            start = time.perf_counter()
            futures = [pool.submit(one, folder) for folder in bench.series]
            result.runs = [future.result() for future in futures]
            result.elapsed_seconds = time.perf_counter() - start
        finally:
            segmenter.close()  # on Ctrl-C or an error, the requests in flight stop waiting
            pool.shutdown(wait=True, cancel_futures=True)
            # Celery's pending results unsubscribe when collected: let them, while Redis is still up
            futures = []
            gc.collect()
    loads: dict[str, int] = {}
    for run in result.runs:
        loads[run.worker] = max(loads.get(run.worker, 0), run.loads or 0)
    result.loads = sum(loads.values())
    result.gpu_per_worker = own_gpu
    return result


# --- (d) TotalSegmentator's own DICOM path --------------------------------------------------

def _as_totalseg_child(log_path: Path, weights_dir: str, home_dir: str) -> None:
    """What a child process running TotalSegmentator sets first: its output and errors to
    ``log_path``, its folders, and its usage statistics off."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from pipeline.model.totalseg import write_totalseg_config

    os.environ["TOTALSEG_WEIGHTS_PATH"] = weights_dir
    os.environ["TOTALSEG_HOME_DIR"] = home_dir
    write_totalseg_config(Path(home_dir))


def _totalseg_dicom_child(dicom_dir: str, seg_path: str, weights_dir: str, home_dir: str, device: str,
                          error_file: str) -> None:
    """A fresh process, as TotalSegmentator's command line runs: DICOM in, DICOM SEG out.
    Its folders and usage statistics are set here, in the child only; its progress bars
    and warnings go to a log file beside the SEG."""
    _as_totalseg_child(Path(seg_path).with_name("totalsegmentator.log"), weights_dir, home_dir)
    try:
        from totalsegmentator.python_api import totalsegmentator

        totalsegmentator(input=dicom_dir, output=seg_path, task="total", fast=True, output_type="dicom_seg",
                         device=device, quiet=True)
    except BaseException as exc:  # SystemExit too: TotalSegmentator exits on some errors
        Path(error_file).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc


def _dicom_path_missing() -> str | None:
    """Why TotalSegmentator's DICOM input or SEG output cannot run here, if it cannot."""
    for package in ("totalsegmentator", "dicom2nifti", "highdicom"):
        if importlib.util.find_spec(package) is None:
            return f"TotalSegmentator's DICOM path needs the package {package}, which is not installed"
    return None


def run_totalseg_dicom(bench: Bench) -> PathResult:
    missing = _dicom_path_missing()
    if missing:
        raise PathUnavailable(missing)
    if not bench.model.fast:
        raise PathUnavailable("(d) is defined for the fast task only")
    result = PathResult("d", loads=len(bench.series))  # one load per process, by construction
    context = multiprocessing.get_context("spawn")
    home = bench.work / "totalseg-dicom-home"
    start = time.perf_counter()
    for n, folder in enumerate(bench.series):
        out = bench.work / "totalseg-dicom-out" / str(n)
        out.mkdir(parents=True)
        seg_path, error = out / "seg.dcm", out / "error.txt"
        began = time.perf_counter()
        process = context.Process(
            target=_totalseg_dicom_child, name="TotalSegmentator DICOM",
            args=(str(folder), str(seg_path), str(bench.model.weights_dir), str(home), bench.device, str(error)),
        )
        process.start()
        process.join()
        wall = time.perf_counter() - began
        if process.exitcode != 0 or not seg_path.is_file():
            reason = error.read_text().strip() if error.exists() else f"exit code {process.exitcode}"
            log = out / "totalsegmentator.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"TotalSegmentator on {folder.name} failed: {reason}\n{tail}")
        result.runs.append(SeriesRun(wall))
    result.elapsed_seconds = time.perf_counter() - start
    return result


# --- (e) TotalSegmentator's API, every series in one process -------------------------------

def _totalseg_api_child(dicom_dirs: list[str], out_dir: str, weights_dir: str, home_dir: str, device: str,
                        times_file: str, error_file: str) -> None:
    """One fresh process for the whole batch: TotalSegmentator's API called per series (DICOM
    in, DICOM SEG out); each series' seconds appended to ``times_file`` as it ends."""
    _as_totalseg_child(Path(out_dir) / "totalsegmentator.log", weights_dir, home_dir)
    try:
        from totalsegmentator.python_api import totalsegmentator

        for n, dicom_dir in enumerate(dicom_dirs):
            began = time.perf_counter()
            seg_path = Path(out_dir) / f"{n}.seg.dcm"
            totalsegmentator(input=dicom_dir, output=str(seg_path), task="total", fast=True, output_type="dicom_seg",
                             device=device, quiet=True)
            if not seg_path.is_file():
                raise RuntimeError(f"no SEG written for {dicom_dir}")
            with open(times_file, "a") as handle:
                handle.write(f"{time.perf_counter() - began}\n")
    except BaseException as exc:  # SystemExit too: TotalSegmentator exits on some errors
        Path(error_file).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc


def run_totalseg_api(bench: Bench) -> PathResult:
    missing = _dicom_path_missing()
    if missing:
        raise PathUnavailable(missing)
    if not bench.model.fast:
        raise PathUnavailable("(e) is defined for the fast task only")
    out = bench.work / "totalseg-api-out"
    out.mkdir(parents=True)
    times, error = out / "times.txt", out / "error.txt"
    result = PathResult("e", loads=1)  # one process for the batch
    start = time.perf_counter()
    process = multiprocessing.get_context("spawn").Process(
        target=_totalseg_api_child, name="TotalSegmentator API",
        args=([str(folder) for folder in bench.series], str(out), str(bench.model.weights_dir),
              str(bench.work / "totalseg-api-home"), bench.device, str(times), str(error)),
    )
    process.start()
    process.join()
    result.elapsed_seconds = time.perf_counter() - start
    if process.exitcode != 0:
        reason = error.read_text().strip() if error.exists() else f"exit code {process.exitcode}"
        log = out / "totalsegmentator.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"TotalSegmentator's API failed: {reason}\n{tail}")
    seconds = [float(line) for line in times.read_text().split()]
    result.runs = [SeriesRun(wall, series=_series_name(folder), slices=len(_files(folder)))
                   for wall, folder in zip(seconds, bench.series)]
    return result


PATHS: dict[str, Callable[[Bench], PathResult]] = {
    "a": run_cold,
    "b": run_warm,
    "c": run_celery,
    "d": run_totalseg_dicom,
    "e": run_totalseg_api,
}


# --- the run and its table -----------------------------------------------------------------

def run_path(key: str, bench: Bench) -> PathResult:
    """One path with its memory sampled; a path that cannot run or fails is reported, not fatal."""
    print(f"running {TITLES[key]} on {len(bench.series)} series ...", flush=True)
    try:
        before = os.times()
        with MemorySampler() as memory:
            result = PATHS[key](bench)
        result.peak_bytes = memory.peak_bytes
        after = os.times()
        result.cpu_seconds = sum(after[:4]) - sum(before[:4])  # user, system, children's user and system
    except PathUnavailable as exc:
        print(f"  {TITLES[key]} cannot run here: {exc}", flush=True)
        return PathResult(key, unavailable=str(exc))
    except Exception as exc:  # a failing path is reported, the others still run
        traceback.print_exc()
        return PathResult(key, unavailable=f"failed: {type(exc).__name__}: {exc}")
    print(f"  done in {result.elapsed_seconds:.1f}s", flush=True)
    return result


def _lend_forward(results: dict[str, PathResult]) -> None:
    """(a), (d) and (e) cannot measure their forward pass: they get (b)'s median."""
    warm = results.get("b")
    for key in ("a", "d", "e"):
        result = results.get(key)
        if result is None or result.unavailable:
            continue
        if warm is not None and not warm.unavailable:
            result.forward_estimate = warm.forward
            result.forward_from = "(b)"
        else:
            result.forward_from = "not measured: needs (b) in --paths"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_table(results: dict[str, PathResult], series_name: str, count: int) -> None:
    header = ("path", "series", "wall s/series (median)", "series/min", "forward s/series", "overhead s/series",
              "model loads", "peak MiB")
    rows = []
    for key, result in results.items():
        if result.unavailable:
            rows.append((TITLES[key], "0", "-", "-", "-", "-", "-", "-"))
            continue
        forward = _seconds(result.forward)
        if result.forward_from == "(b)":
            forward += " (b)"
        rows.append((
            TITLES[key], f"{len(result.runs)}", f"{result.wall:.2f}", f"{result.per_minute:.2f}", forward,
            _seconds(result.overhead), "n/a" if result.loads is None else str(result.loads),
            "n/a" if result.peak_bytes is None else f"{result.peak_bytes / 2**20:.0f}",
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |"

    print()
    print(f"series: {count} x {series_name}")
    print(line(header))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print(line(row))


def print_ratios(results: dict[str, PathResult]) -> None:
    def ok(key: str) -> PathResult | None:
        result = results.get(key)
        return None if result is None or result.unavailable else result

    a, b, c, d = (ok(key) for key in "abcd")
    print()
    if b and d and b.overhead is not None and d.overhead:
        ratio = b.overhead / d.overhead
        print(f"overhead (b) / (d):     {ratio:.3f}  (goal <= 0.333: {'met' if ratio <= 1 / 3 else 'NOT met'})")
    if a and b:
        ratio = b.per_minute / a.per_minute
        print(f"series/min (b) / (a):   {ratio:.2f}  (goal >= 2: {'met' if ratio >= 2 else 'NOT met'})")
    if b and c:
        ratio = c.per_minute / b.per_minute
        if c.gpu_per_worker:
            verdict = f"goal >= 1.7 with a GPU per worker: {'met' if ratio >= 1.7 else 'NOT met'}"
        else:
            verdict = "reported only: the workers share this machine's processors or GPU; the 1.7 goal needs a GPU each"
        print(f"series/min (c) / (b):   {ratio:.2f}  ({verdict})")


def print_parts(results: dict[str, PathResult]) -> None:
    """Where each series' time went on the warm runner (b), the per-series goal, and the
    batch totals of (b) against TotalSegmentator's API in one process (e)."""
    warm, api = results.get("b"), results.get("e")
    warm = None if warm is None or warm.unavailable else warm
    api = None if api is None or api.unavailable else api
    if warm is not None:
        header = ("series", "slices", *(title for _, title in PARTS), "total", "goal s", "met")
        rows = []
        for n, run in enumerate(warm.runs):
            total = sum(run.parts.values())
            goal = 1.5 * run.parts.get("forward", 0.0) + run.parts.get("read", 0.0) + run.parts.get("encode", 0.0)
            met = "first (model start)" if n == 0 else ("yes" if total <= goal else f"no (+{total - goal:.2f} s)")
            rows.append((run.series, str(run.slices), *(f"{run.parts.get(key, 0.0):.2f}" for key, _ in PARTS),
                         f"{total:.2f}", f"{goal:.2f}", met))
        sums = [sum(run.parts.get(key, 0.0) for run in warm.runs) for key, _ in PARTS]
        rows.append(("sum", str(sum(run.slices for run in warm.runs)), *(f"{value:.2f}" for value in sums),
                     f"{sum(sums):.2f}", "", ""))
        _print_rows("(b) warm runner, seconds per part (goal: total <= 1.5 x forward + read + encode)", header, rows)
        if api is not None:
            print(f"{TITLES['e']}, seconds per series: "
                  + ", ".join(f"{run.series} {run.wall_seconds:.2f}" for run in api.runs))
    if warm is not None and api is not None:
        ratio = api.elapsed_seconds / warm.elapsed_seconds
        verdict = "met" if ratio >= 4 else ("bar met, goal not" if ratio >= 3.5 else "NOT met")
        print(f"batch of {len(warm.runs)}: (b) {warm.elapsed_seconds:.1f} s, (e) {api.elapsed_seconds:.1f} s"
              f" (both from the process's start); (e)/(b) = {ratio:.2f}  (goal >= 4, bar 3.5: {verdict})")
        if warm.cpu_seconds and api.cpu_seconds:
            print(f"CPU time (this process and its children, less sensitive to other work on the machine):"
                  f" (b) {warm.cpu_seconds:.1f} s, (e) {api.cpu_seconds:.1f} s; (e)/(b) = "
                  f"{api.cpu_seconds / warm.cpu_seconds:.2f}")


def _median_runs(runs: list[dict[str, PathResult]]) -> dict[str, PathResult]:
    """Each path's run of median batch time (a failed run when any failed)."""
    chosen = {}
    for key in runs[0]:
        results = [run[key] for run in runs]
        failed = [result for result in results if result.unavailable]
        if failed:
            chosen[key] = failed[0]
            continue
        ordered = sorted(results, key=lambda result: result.elapsed_seconds)
        chosen[key] = ordered[(len(ordered) - 1) // 2]
    return chosen


def print_repetitions(runs: list[dict[str, PathResult]]) -> None:
    """With --repeat: each repetition's batch times and (e)/(b), and their median."""
    if len(runs) < 2:
        return
    ratios = []
    print()
    for n, run in enumerate(runs):
        times = ", ".join(f"{key} {result.elapsed_seconds:.1f} s" for key, result in run.items()
                          if not result.unavailable)
        warm, api = run.get("b"), run.get("e")
        line = f"repetition {n + 1}: {times}"
        if warm and api and not warm.unavailable and not api.unavailable:
            ratios.append(api.elapsed_seconds / warm.elapsed_seconds)
            line += f"; (e)/(b) = {ratios[-1]:.2f}"
        print(line)
    if ratios:
        print(f"(e)/(b) over {len(ratios)} repetitions: median {statistics.median(ratios):.2f}"
              f" (from {min(ratios):.2f} to {max(ratios):.2f})")


def _print_rows(title: str, header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |"

    print()
    print(title)
    print(line(header))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print(line(row))


def print_notes(results: dict[str, PathResult], bench: Bench) -> None:
    print()
    model = bench.model
    print(f"device: {bench.device}; weights: {model.weights_dir}; model: TotalSegmentator task total "
          f"({'fast' if model.fast else 'full'}); tta {model.tta}, step_size {model.step_size or 'default'},"
          f" compile {model.compile} (the node's paths); {os.cpu_count()} CPU(s)")
    print("forward = nnU-Net's prediction of each case in the model process (RunReport.forward_seconds);"
          " overhead = wall - forward")
    for key in ("a", "d", "e"):
        result = results.get(key)
        if result is not None and result.forward_from:
            print(f"{TITLES[key]}: TotalSegmentator's unmodified call cannot time its forward pass; forward is "
                  f"{'the median of (b) on the same series' if result.forward_from == '(b)' else result.forward_from}")
    if "d" in results and not results["d"].unavailable:
        print(f"{TITLES['d']}: input is the raw DICOM series (no inversion: same grid, same network work; fine for"
              " timing); output is TotalSegmentator's DICOM SEG file")
    print("(a)-(c): the node's pipeline (read DICOM, invert, segment, encode the SEG in memory);"
          " series/min includes the first series' model load")
    print("peak MiB: the largest sum of PSS of this process and its children (model processes, workers, Redis)")
    for key, result in results.items():
        if result.unavailable:
            print(f"{TITLES[key]}: did not run: {result.unavailable}")


# --- the command -----------------------------------------------------------------------

def _series_name(folder: Path) -> str:
    """A copied series' own name (its copy is ``N-NAME``)."""
    return folder.name.split("-", 1)[1] if "-" in folder.name else folder.name


def _series_folder(name: str) -> Path:
    """A series NAME under the shared test data (DICOM_NODE_TEST_DATA, as the tests read it), or a folder."""
    path = Path(name)
    if path.is_dir():
        return path
    data = Path(os.environ.get("DICOM_NODE_TEST_DATA", REPO.parent / "shared" / "data" / "mri"))
    return data / name


def _cuda_available() -> bool:
    """Asked in a child, so that this process never initialises CUDA before spawning model processes."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default=DEFAULT_SERIES,
                        help="series folder names under the shared MRI data, or folders, comma-separated"
                             f" (default {DEFAULT_SERIES})")
    parser.add_argument("--count", type=int, default=3,
                        help="copies of the series each path runs, in turn (default 3)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="a weights_dir with TotalSegmentator's total fast model (default: the phantom model)")
    parser.add_argument("--paths", default="a,b,c,d,e", help="which paths to run, of a,b,c,d,e (default all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the paths this many times, in turn; the tables show each path's median run")
    parser.add_argument("--no-tta", action="store_true",
                        help="the node's paths with the preset key tta: false (no mirroring)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="the node's paths with this preset step_size (default: the model's own)")
    parser.add_argument("--compile", action="store_true", help="the node's paths with the preset key compile: true")
    args = parser.parse_args(argv)
    args.paths = [key.strip() for key in args.paths.split(",") if key.strip()]
    unknown = [key for key in args.paths if key not in PATHS]
    if unknown or not args.paths:
        parser.error(f"--paths takes a comma-separated subset of a,b,c,d,e, not {unknown or 'nothing'}")
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    return args


def _raise_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # so that every finally stops what it started


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sources = [_series_folder(name.strip()) for name in args.series.split(",") if name.strip()]
    for source in sources:
        if not source.is_dir() or not _files(source):
            print(f"throughput: no series at {source} (set DICOM_NODE_TEST_DATA or pass --series DIR)",
                  file=sys.stderr)
            return 2
    from pipeline.model.totalseg import TotalSegmentator
    from pipeline.settings import ModelSettings, PipelineSettings

    weights = args.weights.resolve()
    try:
        model = ModelSettings(weights_dir=weights, device=args.device, tta=not args.no_tta, step_size=args.step_size,
                              compile=args.compile)
    except ValueError as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 2
    try:
        TotalSegmentator(model).check_weights()
    except Exception as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 2
    if args.device == "gpu" and not _cuda_available():
        print("throughput: --device gpu, but this environment's torch sees no CUDA GPU"
              " (bench/gpu_check.sh says how to install a CUDA build of torch)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    with tempfile.TemporaryDirectory(prefix="dicom-node-throughput-") as tmp:
        work = Path(tmp)
        (work / "tmp").mkdir()
        os.environ["TMPDIR"] = str(work / "tmp")  # the model processes' temporary files too
        tempfile.tempdir = None
        series = []
        for n in range(args.count):
            for source in sources:
                series.append(Path(shutil.copytree(source, work / "series" / f"{len(series)}-{source.name}")))
        model = model.model_copy(update={"home_dir": work / "totalseg-home"})
        bench = Bench(series=series, work=work, settings=PipelineSettings(model=model), device=args.device)
        try:
            runs = []  # per repetition: the paths in turn, so that each sees the machine's load alike
            for repetition in range(args.repeat):
                here = bench
                if args.repeat > 1:
                    print(f"repetition {repetition + 1} of {args.repeat}", flush=True)
                    here = dataclasses.replace(bench, work=bench.work / f"run{repetition}")
                    here.work.mkdir()
                runs.append({key: run_path(key, here) for key in "abcde" if key in args.paths})
            results = _median_runs(runs)
        except BaseException:  # Ctrl-C, SIGTERM: no model process outlives the benchmark
            for child in multiprocessing.active_children():
                child.terminate()
            raise
        tempfile.tempdir = None
        os.environ.pop("TMPDIR")
    _lend_forward(results)
    print_table(results, ",".join(source.name for source in sources), args.count)
    print_parts(results)
    print_ratios(results)
    print_repetitions(runs)
    print_notes(results, bench)
    failed = [key for key, result in results.items() if result.unavailable and result.unavailable.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("throughput: interrupted; what it had started is stopped", file=sys.stderr)
        raise SystemExit(130)
