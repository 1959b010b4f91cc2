"""Viewer benchmark: how fast the full ``total`` task's SEG opens in OHIF v3, the viewer
radiologists open, for our BINARY SEG, our LABELMAP SEG and TotalSegmentator's own
``output_type="dicom_seg"``, on the same series and model, in one run.

    .venv/bin/python bench/viewer.py [--series NAME|DIR] [--weights DIR] [--repeat 3]
                                     [--variants binary,labelmap,totalseg] [--refresh]

The model (default: the full phantom, ``models/phantom_total_full``, all five part-models)
runs once on the series (default ``t1_philips_3t_mprage_sag``, 170 slices) by the node's
pipeline (Equation 1, the warm runner); its label map is cached under
``.cache/viewer-bench/`` and every rerun reuses it (``--refresh`` runs it again). Our two
SEGs are encoded from that label map by ``pipeline.outputs.seg.encode_seg`` (the
defaults' ``omit_empty_frames``). TotalSegmentator's SEG comes from its own
``totalsegmentator(input=DICOM_DIR, output=..., task="total", fast=False,
output_type="dicom_seg")`` on the same series and weights, in a spawned process (its
model run included, also cached); its encode time is that of its own writer,
``save_mask_as_dicomseg``, timed inside the call. It is given the series as acquired (it
does not invert T1), so its label map is its own: the table says how many segments and
voxels each SEG holds.

For each SEG, the table gives: the file size; the seconds to encode it (and save it);
the seconds from the double-click on its thumbnail in OHIF's study browser (after "Yes"
on hydration) to the segmentation held by OHIF with every labelmap image in
cornerstone's cache (median of ``--repeat``, a fresh page load for each); the largest
``JSHeapUsedSize`` of the DevTools performance metrics sampled during that time (the
page's main thread answers them, so a long synchronous parse is sampled around, not
inside) and the largest resident memory of all Chromium processes (sampled from /proc,
which includes the array buffers the JS heap leaves out); and whether every segment's
voxel count on every source image in OHIF equals the file's (the check of
``tests/test_ohif.py``). Nothing is asserted: it prints what it measured.

OHIF is the dist ``make js`` installs (``tests/js/node_modules/@ohif/app``), served by
``tests.support.ohif`` beside an Orthanc with the DICOMweb plugin, in headless Chromium
with software WebGL (``tests.support.chromium``), all on 127.0.0.1. Everything but the
cache is written under one temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_SERIES = "t1_philips_3t_mprage_sag"
DEFAULT_WEIGHTS = REPO / "models" / "phantom_total_full"
CACHE = REPO / ".cache" / "viewer-bench"
VARIANTS = {
    "binary": "dicom-node BINARY (omit empty frames)",
    "labelmap": "dicom-node LABELMAP",
    "totalseg": "TotalSegmentator dicom_seg",
    "floor": "floor: 1 structure on 1 slice (LABELMAP)",
}
LOAD_TIMEOUT = 900.0  # seconds one SEG may take to open in OHIF


@dataclass
class Variant:
    key: str
    path: Path
    encode_seconds: float
    segments: int
    voxels: int
    note: str = ""
    opens: list[float] = field(default_factory=list)
    heap_peak: int = 0  # bytes, JSHeapUsedSize
    rss_peak: int = 0  # bytes, all Chromium processes
    exact: bool | None = None  # OHIF's voxels per segment and source image = the file's
    file_exact: bool | None = None  # the file's = the label map's (None: not the same label map)
    problems: list[str] = field(default_factory=list)


# --- the label map: the node's pipeline, once, cached ---------------------------------------

def _digest(*folders: Path) -> str:
    """Names, sizes and modification times of every file under ``folders``."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def node_label_map(series: Path, weights: Path, refresh: bool):
    """The node's label map of the series (Equation 1, then the full task on the warm
    runner), the algorithm its SEG records, and the seconds the model run took (None
    when it came from the cache)."""
    import numpy as np

    from pipeline.input.series import assemble_series
    from pipeline.input.volume import read_volume
    from pipeline.model.types import LabelMap
    from pipeline.process import algorithm_for, preprocessing_for, read_series
    from pipeline.settings import ModelSettings, PipelineSettings

    paths = sorted(p for p in series.iterdir() if p.is_file())
    cache = CACHE / f"labels-{series.name}-{_digest(series, weights)}.npz"
    work = Path(tempfile.gettempdir())
    settings = PipelineSettings(model=ModelSettings(fast=False, weights_dir=weights, home_dir=work / "totalseg-home"))
    read = read_series(paths, settings)
    volume = read_volume(assemble_series(read.headers, min_slices=settings.min_slices, four_d=settings.four_d))
    mode, why = preprocessing_for(settings, read.classification)
    if mode is None:
        raise SystemExit(f"viewer: the node would not segment {series.name}: {why}")
    if cache.is_file() and not refresh:
        stored = np.load(cache)
        names = {int(k): v for k, v in json.loads(str(stored["names"])).items()}
        return LabelMap(stored["array"], names, volume), algorithm_for(settings, mode, read.classification), None

    from pipeline.input.preprocess import preprocess
    from pipeline.model.runner import ModelRunner
    from pipeline.model.segment import make_segmenter

    options = settings.preprocessing
    prepared = volume.with_array(preprocess(volume.voxels, mode, clip_min=options.clip_min,
                                            clip_max=options.clip_max,
                                            background_percentile=options.background_percentile))
    print(f"running the full total task on {series.name} (once; cached in {CACHE.relative_to(REPO)}) ...", flush=True)
    began = time.perf_counter()
    with ModelRunner(settings.model) as runner:
        label_map = make_segmenter(settings.model, runner).segment(prepared)
    seconds = time.perf_counter() - began
    array = np.ascontiguousarray(label_map.array.astype(np.uint16))
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".part.npz")
    np.savez_compressed(partial, array=array, names=json.dumps({str(k): v for k, v in label_map.names.items()}))
    partial.replace(cache)
    return LabelMap(array, label_map.names, volume), algorithm_for(settings, mode, read.classification), seconds


def synthetic_label_map(label_map):
    """Every one of the task's 117 structures present, as on a whole-body CT: a block of
    each, 20 x 20 voxels on 12 slices (the blocks of ``bench/seg_encode.py``), on the
    model's grid, in place of the model's labels (the model finds few structures in a head)."""
    import dataclasses

    import numpy as np

    shape = label_map.array.shape
    array = np.zeros(shape, np.uint16)
    for label in sorted(label_map.names):
        k, j = divmod(label - 1, 11)
        z0 = (k * 13) % (shape[0] - 12)
        array[z0:z0 + 12, 10 + 22 * j: 30 + 22 * j, 10 + 22 * (k % 11): 30 + 22 * (k % 11)] = label
    return dataclasses.replace(label_map, array=array)


def floor_label_map(label_map):
    """One structure, a 20 x 20 block on the middle slice: what opening any SEG of the
    series costs in OHIF (the source series' images, the viewport), whatever it holds."""
    import dataclasses

    import numpy as np

    array = np.zeros(label_map.array.shape, np.uint16)
    array[array.shape[0] // 2, 100:120, 100:120] = min(label_map.names)
    return dataclasses.replace(label_map, array=array)


def encode_ours(label_map, algorithm, kind: str, out: Path, *, new_uids: bool = False) -> Variant:
    """``new_uids``: the SEG's UIDs follow from the series and the configuration, so a
    second SEG of the same options (the floor) needs its own to be a series of its own."""
    from pydicom.uid import generate_uid

    from pipeline.outputs.options import SegOptions
    from pipeline.outputs.seg import encode_seg

    options = SegOptions(kind.upper())
    began = time.perf_counter()
    seg = encode_seg(label_map, algorithm, options)
    if new_uids:
        seg.SeriesInstanceUID = generate_uid()
        seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.save_as(out, enforce_file_format=True)
    seconds = time.perf_counter() - began
    present = label_map.present
    voxels = int((label_map.array > 0).sum())
    note = "" if options.omit_empty_frames else "all frames"
    return Variant(kind, out, seconds, len(present), voxels, note)


# --- TotalSegmentator's own DICOM SEG ---------------------------------------------------------

def _totalseg_child(dicom_dir: str, seg_path: str, weights_dir: str, home_dir: str, timing_file: str) -> None:
    """TotalSegmentator's whole call, as its users run it, with its SEG writer timed."""
    log = os.open(Path(seg_path).with_name("totalsegmentator.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from pipeline.model.totalseg import write_totalseg_config

    os.environ["TOTALSEG_WEIGHTS_PATH"] = weights_dir
    os.environ["TOTALSEG_HOME_DIR"] = home_dir
    write_totalseg_config(Path(home_dir))
    from totalsegmentator.config import setup_nnunet

    setup_nnunet()  # nnU-Net reads its folders when it is first imported, just below
    import totalsegmentator.nnunet as totalseg_nnunet
    from totalsegmentator.python_api import totalsegmentator

    writer = totalseg_nnunet.save_mask_as_dicomseg

    def timed(*args, **kwargs):
        began = time.perf_counter()
        result = writer(*args, **kwargs)
        Path(timing_file).write_text(json.dumps({"encode_seconds": time.perf_counter() - began}))
        return result

    totalseg_nnunet.save_mask_as_dicomseg = timed
    began = time.perf_counter()
    totalsegmentator(input=dicom_dir, output=seg_path, task="total", fast=False, output_type="dicom_seg",
                     device="cpu", quiet=True)
    timing = json.loads(Path(timing_file).read_text())
    timing["call_seconds"] = time.perf_counter() - began
    Path(timing_file).write_text(json.dumps(timing))


def write_with_totalseg(label_map, series: Path, out: Path) -> Variant:
    """The label map written by TotalSegmentator's own SEG writer, ``save_mask_as_dicomseg``
    (what its ``output_type="dicom_seg"`` calls after its model), given the mask as its
    pipeline gives it for a sagittal series: (rows, columns, slices) whose writer turns
    it to (slices, rows, columns), flips rows and columns, and pairs slice k with the
    k-th file by name."""
    import contextlib
    import io

    import numpy as np
    from totalsegmentator.dicom_io import save_mask_as_dicomseg

    slices = label_map.volume.series.slices
    by_name = {s.path.name: n for n, s in enumerate(slices)}
    files = sorted(p.name for p in series.glob("*.dcm")) or sorted(p.name for p in series.iterdir() if p.is_file())
    in_files = np.stack([label_map.array[by_name[name]] for name in files])  # (file, row, column)
    mask = np.transpose(in_files[:, ::-1, ::-1], (2, 1, 0))
    began = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        save_mask_as_dicomseg(mask, label_map.names, str(series), out, np.eye(4))
    seconds = time.perf_counter() - began
    return Variant("totalseg", out, seconds, len(label_map.present), int((label_map.array > 0).sum()),
                   "TotalSegmentator's writer, save_mask_as_dicomseg, on the same label map")


def encode_totalseg(series: Path, weights: Path, work: Path, refresh: bool) -> Variant:
    import numpy as np
    import pydicom

    cache = CACHE / f"totalseg-{series.name}-{_digest(series, weights)}"
    seg, timing = cache / "seg.dcm", cache / "timing.json"
    if refresh or not (seg.is_file() and timing.is_file()):
        print(f"running TotalSegmentator's own dicom_seg call on {series.name} (once; cached) ...", flush=True)
        out = work / "totalseg"
        out.mkdir()
        process = multiprocessing.get_context("spawn").Process(
            target=_totalseg_child, name="TotalSegmentator dicom_seg",
            args=(str(series), str(out / "seg.dcm"), str(weights), str(work / "totalseg-home"), str(out / "timing.json")))
        process.start()
        process.join()
        if process.exitcode != 0 or not (out / "seg.dcm").is_file():
            log = out / "totalsegmentator.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"TotalSegmentator's dicom_seg call failed (exit {process.exitcode}):\n{tail}")
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "timing.json", timing)
        shutil.copy2(out / "seg.dcm", seg)
    times = json.loads(timing.read_text())
    ds = pydicom.dcmread(seg)
    voxels = int(np.count_nonzero(ds.pixel_array))
    note = f"its whole call {times['call_seconds']:.0f} s (model included)"
    return Variant("totalseg", seg, times["encode_seconds"], len(ds.SegmentSequence), voxels, note)


def file_matches_label_map(variant: Variant, label_map) -> bool:
    """Whether the SEG file holds, per structure and source image, the label map's voxels."""
    import numpy as np

    from tests.test_ohif import seg_expectation

    found = seg_expectation(variant.path).voxels
    expected: dict[str, dict[str, int]] = {}
    for n, source in enumerate(label_map.volume.series.slices):
        values, counts = np.unique(label_map.array[n][label_map.array[n] > 0], return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            expected.setdefault(label_map.names[value], {})[f"{source.header.SOPInstanceUID}:1"] = count
    return found == expected


# --- OHIF ---------------------------------------------------------------------------------------

# Hydrated: the one segmentation OHIF holds lists its segments and every one of its
# labelmap images is in cornerstone's cache (what tests.support.ohif's wait waits for,
# without counting the voxels, which would slow the page it measures).
_HYDRATED = """
const s = window.services && window.services.segmentationService;
if (!s) return false;
const found = s.getSegmentations();
if (found.length !== 1) return false;
const seg = found[0];
if (!Object.values(seg.segments || {}).filter(Boolean).length) return false;
const labelmap = seg.representationData && seg.representationData.Labelmap;
if (!labelmap) return false;
const layers = labelmap.labelmaps ? Object.values(labelmap.labelmaps) : [labelmap];
const ids = layers.flatMap(l => l.imageIds || []);
return ids.length > 0 && ids.every(id => window.cornerstone.cache.getImage(id));
"""


class ChromiumMemory:
    """The largest sum of resident memory of Chromium's processes (the driver's children),
    sampled from /proc in a thread: it goes on while the page's main thread is busy."""

    def __init__(self, driver_pid: int, interval: float = 0.05) -> None:
        self.root = driver_pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ChromiumMemory":
        self.peak = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._rss(pid) for pid in self._descendants()))
            self._stop.wait(self.interval)

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry.name))
        found, todo = [], list(children.get(self.root, []))
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


def _heap(driver) -> int:
    metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
    return int(next((m["value"] for m in metrics if m["name"] == "JSHeapUsedSize"), 0))


def open_in_ohif(viewer, study: str, source_series: str, variant: Variant, seg_series: str, last: bool) -> None:
    """One fresh page load, the double-click, "Yes", the wait until hydrated: its seconds,
    heap and memory go to ``variant``; on the ``last`` load, OHIF's voxels are checked."""
    from tests.support.wait import wait_until
    from tests.test_ohif import seg_expectation, seg_problems

    driver = viewer.driver
    viewer.open_study(study, [source_series, seg_series])
    driver.execute_cdp_cmd("Performance.enable", {})
    driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
    heap = _heap(driver)
    with ChromiumMemory(driver.service.process.pid) as memory:
        began = time.monotonic()
        display_set = viewer.double_click(seg_series)
        if not viewer.hydrate(timeout=60 if display_set["referenced"] else 5):
            raise RuntimeError(f"{VARIANTS[variant.key]}: OHIF did not offer to open the SEG")

        def hydrated() -> bool:
            nonlocal heap
            heap = max(heap, _heap(driver))
            return driver.execute_script(_HYDRATED)

        wait_until(hydrated, LOAD_TIMEOUT, 0.1, f"OHIF's segmentation of {VARIANTS[variant.key]}")
        variant.opens.append(time.monotonic() - began)
    variant.heap_peak = max(variant.heap_peak, heap)
    variant.rss_peak = max(variant.rss_peak, memory.peak)
    if last:
        held = viewer.segmentations()
        problems = seg_problems(seg_expectation(variant.path), held[0] if len(held) == 1 else None)
        problems += viewer.problems()
        variant.exact = not problems
        variant.problems = problems


def measure_in_ohif(source: Path, variants: list[Variant], repeat: int, work: Path) -> None:
    import pydicom

    from tests.support.chromium import start_chromium
    from tests.support.ohif import OhifServer, OhifViewer
    from tests.support.orthanc import Orthanc
    from tests.support.paths import free_port

    first = pydicom.dcmread(next(p for p in sorted(source.iterdir()) if p.is_file()), stop_before_pixels=True)
    study, source_series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    orthanc = Orthanc(work / "orthanc", node_port=free_port(), dicomweb=True).start()
    server = driver = None
    try:
        for path in sorted(source.iterdir()):
            if path.is_file():
                orthanc.post("/instances", path.read_bytes())
        series_of = {}
        for variant in variants:
            orthanc.post("/instances", variant.path.read_bytes())
            series_of[variant.key] = str(pydicom.dcmread(variant.path, stop_before_pixels=True).SeriesInstanceUID)
        if len(set(series_of.values())) != len(series_of):
            raise RuntimeError(f"two SEGs share a series: {series_of}")
        server = OhifServer(orthanc.dicomweb_url).start()
        driver = start_chromium((1400, 900), webgl=True, logs=True)
        viewer = OhifViewer(driver, server)
        for variant in variants:
            for n in range(repeat):
                print(f"opening {VARIANTS[variant.key]} in OHIF ({n + 1} of {repeat}) ...", flush=True)
                try:
                    open_in_ohif(viewer, study, source_series, variant, series_of[variant.key], last=n == repeat - 1)
                except Exception as exc:  # reported in the table, the other variants still run
                    variant.problems.append(f"{type(exc).__name__}: {exc}")
                    break
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            server.stop()
        orthanc.stop()


# --- the table --------------------------------------------------------------------------------

def print_table(variants: list[Variant], series: str, weights: Path, repeat: int, model_seconds: float | None,
                ohif: str, labels: str) -> None:
    print()
    what = "the model's label map" if labels == "model" else "all 117 structures as blocks (--labels synthetic)"
    print(f"Full `total` task ({weights.name}) on {series}, {what}; OHIF {ohif} in headless Chromium"
          f" (SwiftShader); open: median of {repeat} fresh page loads")
    if model_seconds is not None:
        print(f"(the node's model run took {model_seconds:.0f} s; cached for reruns)")
    print()
    print("| SEG | segments | voxels | size MB | encode s | open in OHIF s (runs) | peak JS heap MB"
          " | peak Chromium RSS MB | OHIF = file | file = label map |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for v in variants:
        opened = (f"{statistics.median(v.opens):.1f} ({', '.join(f'{s:.1f}' for s in v.opens)})"
                  if v.opens else "did not open")
        exact = {True: "yes", False: "NO", None: "not checked"}[v.exact]
        file_exact = {True: "yes", False: "NO", None: "its own model run"}[v.file_exact]
        print(f"| {VARIANTS[v.key]} | {v.segments} | {v.voxels} | {v.path.stat().st_size / 1e6:.1f}"
              f" | {v.encode_seconds:.1f} | {opened} | {v.heap_peak / 1e6:.0f} | {v.rss_peak / 1e6:.0f} | {exact}"
              f" | {file_exact} |")
    print()
    reference = next((v for v in variants if v.key == "totalseg" and v.opens), None)
    for v in variants:
        if v.key not in ("totalseg", "floor") and v.opens and reference is not None:
            ratio = statistics.median(reference.opens) / statistics.median(v.opens)
            print(f"{VARIANTS[v.key]} opens {ratio:.2f}x as fast as TotalSegmentator's (goal for the default: >= 3)")
    floor = next((v for v in variants if v.key == "floor" and v.opens), None)
    if floor is not None:
        least = statistics.median(floor.opens)
        for v in variants:
            if v.key != "floor" and v.opens:
                print(f"{VARIANTS[v.key]}: {statistics.median(v.opens) - least:.1f} s above the floor")
        if reference is not None:
            print(f"the floor bounds any SEG's speed-up over TotalSegmentator's here to"
                  f" {statistics.median(reference.opens) / least:.2f}x")
    for v in variants:
        if v.note:
            print(f"{VARIANTS[v.key]}: {v.note}")
        for problem in v.problems[:8]:
            print(f"{VARIANTS[v.key]}: problem: {problem[:300]}")


# --- the command ---------------------------------------------------------------------------------

def _series_folder(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    from tests.support.paths import data_dir

    return data_dir() / name


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default=DEFAULT_SERIES,
                        help=f"a series folder name under the shared MRI data, or a folder (default {DEFAULT_SERIES})")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="a weights_dir with TotalSegmentator's full total task (default: the full phantom)")
    parser.add_argument("--repeat", type=int, default=3, help="page loads per SEG (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"which SEGs, of {','.join(VARIANTS)} (default all)")
    parser.add_argument("--labels", choices=("model", "synthetic"), default="model",
                        help="model: the model's label map, TotalSegmentator's own dicom_seg call;"
                             " synthetic: all 117 structures as blocks, TotalSegmentator's writer on them")
    parser.add_argument("--refresh", action="store_true", help="run the models again instead of using the cache")
    args = parser.parse_args(argv)
    args.variants = [key.strip() for key in args.variants.split(",") if key.strip()]
    unknown = [key for key in args.variants if key not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}, not {unknown or 'nothing'}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    source = _series_folder(args.series)
    if not source.is_dir():
        print(f"viewer: no series at {source} (set DICOM_NODE_TEST_DATA or pass --series DIR)", file=sys.stderr)
        return 2
    from pipeline.model.totalseg import TotalSegmentator
    from pipeline.settings import ModelSettings
    from tests.support.ohif import ohif_version

    weights = args.weights.resolve()
    try:
        TotalSegmentator(ModelSettings(fast=False, weights_dir=weights)).check_weights()
        ohif = ohif_version()
    except Exception as exc:
        print(f"viewer: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dicom-node-viewer-") as tmp:
        work = Path(tmp)
        (work / "tmp").mkdir()
        os.environ["TMPDIR"] = str(work / "tmp")  # the model processes' temporary files too
        tempfile.tempdir = None
        try:
            label_map, algorithm, model_seconds = node_label_map(source, weights, args.refresh)
            if args.labels == "synthetic":
                label_map = synthetic_label_map(label_map)
            variants = []
            for key in args.variants:
                print(f"encoding {VARIANTS[key]} ...", flush=True)
                if key == "totalseg" and args.labels == "model":
                    variants.append(encode_totalseg(source, weights, work, args.refresh))
                else:
                    if key == "totalseg":
                        variants.append(write_with_totalseg(label_map, source, work / "totalseg.dcm"))
                    elif key == "floor":
                        floor = floor_label_map(label_map)
                        variants.append(encode_ours(floor, algorithm, "labelmap", work / "floor.dcm", new_uids=True))
                        variants[-1].key = "floor"
                        variants[-1].file_exact = file_matches_label_map(variants[-1], floor)
                        continue
                    else:
                        variants.append(encode_ours(label_map, algorithm, key, work / f"{key}.dcm"))
                    variants[-1].file_exact = file_matches_label_map(variants[-1], label_map)
            measure_in_ohif(source, variants, args.repeat, work)
            print_table(variants, source.name, weights, args.repeat, model_seconds, ohif, args.labels)
        except BaseException:
            for child in multiprocessing.active_children():
                child.terminate()
            traceback.print_exc()
            return 1
        finally:
            tempfile.tempdir = None
            os.environ.pop("TMPDIR", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
