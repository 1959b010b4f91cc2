"""Soak: a hospital day compressed against a real node, with faults; prints the invariants
and the figures (see tests/support/soak.py for what it sends, breaks and checks).

    .venv/bin/python bench/soak.py [--series N] [--minutes M] [--large-t1-every K] [--keep]

By default 300 series (a third T1, the rest series the node must skip) from three
concurrent senders (dcmtk storescu; pynetdicom one association at a time; pynetdicom
split over several associations), sent back to back (``--minutes M`` spreads them over
M minutes instead); two destination outages and one ``kill -9`` of the node with a
restart; the spool on a 256 MiB tmpfs (needs root) with retention periods of minutes.
It prints the T1 series with exactly one SEG reception, the partial SEGs, each skipped
series with its reason, the spool, database and RSS at the start, peak and end, the time
from a series' last instance to its SEG (p50, p95) and ``/healthz`` at the end. Exit
status 0 when every invariant holds, 1 otherwise, 2 when it cannot run here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.paths import REPO, data_dir  # noqa: E402
from tests.support.soak import SoakSettings, format_report, run_soak  # noqa: E402

PHANTOM = REPO / "models" / "phantom_total_fast"
PHANTOM_CACHE = REPO / ".cache" / "phantom_total_fast"
CHECKPOINT = ("Dataset297_TotalSegmentator_total_3mm_1559subj/"
              "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth")


def _weights() -> Path:
    """The phantom model installed as TotalSegmentator weights, as the tests use it."""
    for folder in (PHANTOM, PHANTOM_CACHE):
        if (folder / CHECKPOINT).is_file():
            return folder
    from demo.phantom_model import train_phantom_model

    train_phantom_model(PHANTOM_CACHE)
    return PHANTOM_CACHE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=300, help="series in the day (default 300)")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="spread the series over this many minutes (default 0: back to back)")
    parser.add_argument("--large-t1-every", type=int, default=0, metavar="K",
                        help="every K-th T1 the 170-slice Philips MPRAGE (default 0: none)")
    parser.add_argument("--spool-megabytes", type=int, default=256, help="the tmpfs under the spool (MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the node's log, the SEGs)")
    args = parser.parse_args()
    if not (data_dir() / "MANIFEST.md").is_file():
        print(f"the shared MRI series are missing: {data_dir()}", file=sys.stderr)
        return 2

    settings = replace(SoakSettings(), series=args.series, spread_minutes=args.minutes,
                       large_t1_every=args.large_t1_every, spool_megabytes=args.spool_megabytes)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)

    try:
        report = run_soak(work, data_dir(), _weights(), settings, progress)
    except BaseException as exc:
        if type(exc).__name__ == "Skipped":  # small_disk: no root, or no tmpfs here
            print(f"cannot run here: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for line in format_report(report):
        print(line)
    return 0 if report.findings.ok and report.settled and report.spool_end_bytes <= report.spool_bound_bytes else 1


if __name__ == "__main__":
    raise SystemExit(main())
