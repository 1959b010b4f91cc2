"""Output benchmark: the encode time and size of each result object (SEG, RTSTRUCT,
overlay, report) for a 117-label map on the grid of t1_philips_3t_mprage_sag (the map
bench/seg_encode.py builds), and the time of all four together over the SEG's alone
(the goal is at most 2; reported, not checked).

    .venv/bin/python bench/outputs.py [--series DIR] [--repeat N]

In one process: each encoder runs once first (imports, highdicom's tables, caches), then
``--repeat`` times timed, as in a node that has been running; seconds are the median.
The overlay is given the decoded source volume and the report the SEG, as a job that
makes the SEG passes them. Sizes are of the files as saved (the overlay: all its
images). The report without the SEG (outlines on the source images) is timed too, apart.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.paths import data_dir  # noqa: E402


def _label_map(series_dir: Path):
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume
    from pipeline.labels import total_class_names
    from pipeline.model.types import LabelMap

    volume = read_volume(load_series(sorted(series_dir.glob("*.dcm"))))
    shape = (len(volume.series.slices), volume.series.rows, volume.series.columns)
    array = np.zeros(shape, np.uint16)
    # 117 blocks, each on several slices, spread over the volume (as bench/seg_encode.py)
    for label in range(1, 118):
        k, j = divmod(label - 1, 11)
        z0 = (k * 13) % (shape[0] - 12)
        array[z0:z0 + 12, 10 + 22 * j: 30 + 22 * j, 10 + 22 * (k % 11): 30 + 22 * (k % 11)] = label
    return LabelMap(array, total_class_names(), volume), volume


def _timed(encode, repeat: int):
    result = encode()  # one-time costs
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = encode()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def _size(result, folder: Path, name: str) -> int:
    datasets = result if isinstance(result, list) else [result]
    total = 0
    for number, ds in enumerate(datasets):
        path = folder / f"{name}-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=data_dir() / "t1_philips_3t_mprage_sag")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from pipeline.input.classify import Classification, SequenceClass
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.outputs.overlay import encode_overlay
    from pipeline.outputs.report import encode_report
    from pipeline.outputs.rtstruct import encode_rtstruct
    from pipeline.outputs.seg import encode_seg
    from pipeline.process import algorithm_for
    from pipeline.settings import PipelineSettings

    label_map, volume = _label_map(args.series)
    algorithm = algorithm_for(PipelineSettings(), PreprocessingMode.INVERT_BLACK_BACKGROUND,
                              Classification(SequenceClass.T1, True, "bench"))
    seg, seg_seconds = _timed(lambda: encode_seg(label_map, algorithm), args.repeat)
    encoders = {
        "SEG (BINARY)": (lambda: seg, seg_seconds),
        "RTSTRUCT": (lambda: encode_rtstruct(label_map, algorithm), None),
        "overlay": (lambda: encode_overlay(label_map, algorithm, source=volume), None),
        "report (with SEG)": (lambda: encode_report(label_map, algorithm, seg), None),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (encode, seconds) in encoders.items():
            result, timed = (encode(), seconds) if seconds is not None else _timed(encode, args.repeat)
            results[name] = (timed, _size(result, Path(tmp), name.split()[0]),
                             len(result) if isinstance(result, list) else 1)
        alone, alone_seconds = _timed(lambda: encode_report(label_map, algorithm), args.repeat)
        alone_size = _size(alone, Path(tmp), "report-alone")

    print(f"117 labels on the grid of {args.series.name} ({len(volume.series.slices)} slices);"
          f" median of {args.repeat} run(s) each")
    print(f"{'output':24s} {'seconds':>8s} {'size MB':>9s} {'files':>6s}")
    for name, (seconds, size, files) in results.items():
        print(f"{name:24s} {seconds:8.2f} {size / 1e6:9.2f} {files:6d}")
    total = sum(seconds for seconds, _, _ in results.values())
    print(f"{'all four':24s} {total:8.2f} {sum(size for _, size, _ in results.values()) / 1e6:9.2f}")
    print(f"all four / SEG: time {total / seg_seconds:.2f} (goal <= 2)")
    print(f"{'(report without SEG)':24s} {alone_seconds:8.2f} {alone_size / 1e6:9.2f} {1:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
