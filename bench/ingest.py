"""Ingest benchmark: one series sent with dcmtk storescu to the node, to dcmtk storescp
and to Orthanc, in one run; prints instances per second for each and the node's ratios.

    .venv/bin/python bench/ingest.py [--series DIR] [--repeat N]

Every peer listens on 127.0.0.1 only. The node runs as ``dicom-node serve`` with an
empty weights folder, so its processing fails fast and does not compete with ingest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.dcmtk import StoreSCP, storescu  # noqa: E402
from tests.support.node import NodeProcess, node_config  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.paths import data_dir, free_port  # noqa: E402


def _rate(port: int, called: str, files: list[Path], repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        storescu(port, files, called=called)
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> int:
    default = data_dir() / "t1_philips_3t_mprage_sag"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=default)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    files = sorted(args.series.glob("*.dcm"))
    if not files:
        print(f"no .dcm files in {args.series}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node_port = free_port()
        orthanc = Orthanc(work / "orthanc", node_port=node_port).start()
        storescp = StoreSCP(work / "storescp").start()
        config = node_config(work / "node", destination=("NOBODY", free_port()), weights_dir=work / "none")
        config["node"]["port"] = node_port
        config["completion"] = {"stable_seconds": 600, "complete_on_release": False}
        node = NodeProcess(work / "node", config).start()
        try:
            results = {
                "dicom-node": _rate(node.port, "DICOMNODE", files, args.repeat),
                "dcmtk storescp": _rate(storescp.port, storescp.ae_title, files, args.repeat),
                "Orthanc": _rate(orthanc.dicom_port, orthanc.ae_title, files, args.repeat),
            }
        finally:
            node.stop()
            storescp.stop()
            orthanc.stop()

    print(f"series: {args.series.name} ({len(files)} instances), median of {args.repeat} run(s)")
    for name, rate in results.items():
        print(f"{name:15s} {rate:8.1f} instances/s")
    for name in ("dcmtk storescp", "Orthanc"):
        print(f"node / {name}: {results['dicom-node'] / results[name]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
