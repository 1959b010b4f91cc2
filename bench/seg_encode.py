"""SEG encoding benchmark: a 117-label map on the grid of t1_philips_3t_mprage_sag,
encoded as BINARY and as LABELMAP by dicom-node's writer, and by TotalSegmentator's
own ``save_mask_as_dicomseg``, in one run. Prints seconds, file size and peak memory
(the rise of the process's maximum resident set during encoding) for each, and our
ratios to TotalSegmentator's writer.

    .venv/bin/python bench/seg_encode.py [--series DIR] [--repeat N]

Each writer runs in a fresh subprocess, so that caches and memory peaks do not leak
between them. In it, the first encoding gives the peak memory and pays the one-time
costs (imports, highdicom's standard tables); the second is timed, as in a node that
has been running. Seconds are the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.paths import data_dir  # noqa: E402

_WORKER = r"""
import json, sys, time, resource, io, warnings, logging
from pathlib import Path
import numpy as np
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from pipeline.labels import total_class_names
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.model.types import LabelMap

kind, series_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
paths = sorted(series_dir.glob("*.dcm"))
series = load_series(paths)
volume = read_volume(series)
shape = (len(series.slices), series.rows, series.columns)
array = np.zeros(shape, np.uint16)
# 117 blocks, each on several slices, spread over the volume
for label in range(1, 118):
    k, j = divmod(label - 1, 11)
    z0 = (k * 13) % (shape[0] - 12)
    array[z0:z0 + 12, 10 + 22 * j: 30 + 22 * j, 10 + 22 * (k % 11): 30 + 22 * (k % 11)] = label
names = total_class_names()

def encode():
    if kind in ("BINARY", "LABELMAP"):
        from pipeline.input.classify import Classification, SequenceClass
        from pipeline.input.preprocess import PreprocessingMode
        from pipeline.process import algorithm_for
        from pipeline.outputs.options import SegOptions
        from pipeline.outputs.seg import encode_seg
        from pipeline.settings import PipelineSettings
        seg = encode_seg(LabelMap(array, names, volume), algorithm_for(
            PipelineSettings(), PreprocessingMode.INVERT_BLACK_BACKGROUND,
            Classification(SequenceClass.T1, True, "bench")), SegOptions(kind))
        seg.save_as(out, enforce_file_format=True)
    else:
        from contextlib import redirect_stderr
        from totalsegmentator.dicom_io import save_mask_as_dicomseg
        # its writer takes the mask as (rows, columns, slices), in the files' sorted order
        order = {s.path.name: i for i, s in enumerate(series.slices)}
        files = sorted(p.name for p in paths)
        mask = np.stack([array[order[name]] for name in files], axis=-1)
        with redirect_stderr(io.StringIO()):
            save_mask_as_dicomseg(mask, names, str(series_dir), out, np.eye(4))

# first call: peak memory (and one-time start-up costs: imports, highdicom's tables)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
encode()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
# second call: seconds, as in a node that has been running
start = time.perf_counter()
encode()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "size_bytes": out.stat().st_size}))
"""


def _run(kind: str, series: Path, work: Path) -> dict:
    out = work / f"{kind}.dcm"
    result = subprocess.run([sys.executable, "-c", _WORKER, kind, str(series), str(out)],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    default = data_dir() / "t1_philips_3t_mprage_sag"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=default)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    writers = {"dicom-node BINARY": "BINARY", "dicom-node LABELMAP": "LABELMAP", "TotalSegmentator": "TOTALSEG"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in writers.items():
            runs = [_run(kind, args.series, Path(tmp)) for _ in range(args.repeat)]
            results[name] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_bytes": max(r["peak_bytes"] for r in runs),
                "size_bytes": runs[-1]["size_bytes"],
            }
    print(f"117 labels on the grid of {args.series.name}; median of {args.repeat} run(s) each")
    print(f"{'writer':22s} {'seconds':>8s} {'size MB':>9s} {'peak MB':>9s}")
    for name, r in results.items():
        print(f"{name:22s} {r['seconds']:8.2f} {r['size_bytes'] / 1e6:9.2f} {r['peak_bytes'] / 1e6:9.1f}")
    reference = results["TotalSegmentator"]
    for name in ("dicom-node BINARY", "dicom-node LABELMAP"):
        r = results[name]
        print(f"{name} / TotalSegmentator: time {r['seconds'] / reference['seconds']:.2f},"
              f" size {r['size_bytes'] / reference['size_bytes']:.2f},"
              f" peak memory {r['peak_bytes'] / reference['peak_bytes']:.2f}")
    binary, labelmap = results["dicom-node BINARY"], results["dicom-node LABELMAP"]
    print(f"LABELMAP speed-up over our BINARY: {binary['seconds'] / labelmap['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
