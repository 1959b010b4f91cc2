"""Send memory benchmark: the peak memory of sending one large result object, by DIMSE
C-STORE to dcmtk's storescp and by DICOMweb STOW-RS to Orthanc, with the senders of this
checkout ("now") and, for comparison, those of a git revision ("before", default 7f70025,
the last whose senders read whole objects).

    .venv/bin/python bench/send_memory.py [--size-mb 200] [--files 25] [--before REV] [--no-stow]

The object is ``--files`` MR instances of random 16-bit pixels, ``--size-mb`` in all
(``--files 1``: one multi-frame file of that size). Each send runs in a child process of
its own; what is reported is the growth of its peak resident memory (VmHWM) during the
send, over what it held after its imports. Reported, not checked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.dcmtk import StoreSCP  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.paths import LOCALHOST, data_dir, free_port  # noqa: E402

# Runs in the child: argv = module file, protocol, target (json), paths (json).
_CHILD = r"""
import importlib.util, json, sys, time
from pathlib import Path

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
module_file, protocol, target, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
spec = importlib.util.spec_from_file_location("sender_under_test", module_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from dicom_node.config import Destination
paths = [Path(p) for p in paths]
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
base = rss("VmRSS:")
started = time.perf_counter()
if protocol == "dimse":
    outcome = module.send_files(paths, Destination(**target), calling_ae_title="BENCH", timeout=120)
else:
    outcome = module.stow_files(paths, Destination(**target), timeout=300)
print(json.dumps({"status": outcome.status, "seconds": time.perf_counter() - started,
                  "base": base, "peak": rss("VmHWM:")}))
"""


def make_object(folder: Path, size_mb: int, files: int) -> list[Path]:
    """``files`` MR instances (one multi-frame file when 1) of random pixels, ``size_mb`` in all."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(sorted((data_dir() / "t1_siemens_3t_fl2d_sag_hfs").glob("*.dcm"))[0])
    side = 1024
    frames_total = max(1, size_mb * 1024 * 1024 // (side * side * 2))
    per_file = max(1, frames_total // files)
    rng = np.random.default_rng(0)
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        ds = template.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = side
        ds.InstanceNumber = index + 1
        pixels = rng.integers(0, 4096, (per_file, side, side), dtype=np.uint16)
        if per_file > 1:
            ds.NumberOfFrames = per_file
        ds.PixelData = pixels.tobytes()
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sender_files(before: str, folder: Path) -> dict[str, dict[str, Path]]:
    """The sender modules of ``before`` (from git) and of this checkout."""
    found = {"now": {"dimse": REPO / "dicom_node/send/dimse.py", "dicomweb": REPO / "dicom_node/send/dicomweb.py"}}
    old = {}
    for name in ("dimse", "dicomweb"):
        source = subprocess.run(["git", "show", f"{before}:dicom_node/send/{name}.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        old[name] = folder / f"before_{name}.py"
        old[name].write_text(source)
    found["before"] = old
    return found


def send(module: Path, protocol: str, target: dict, paths: list[Path]) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(module), protocol, json.dumps(target),
                             json.dumps([str(p) for p in paths])], cwd=REPO, capture_output=True, text=True,
                            timeout=900, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=25)
    parser.add_argument("--before", default="7f70025", help="the git revision to compare with")
    parser.add_argument("--no-stow", action="store_true", help="DIMSE only (no Orthanc)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="send-memory-") as tmp:
        folder = Path(tmp)
        paths = make_object(folder / "object", args.size_mb, args.files)
        size = sum(p.stat().st_size for p in paths)
        print(f"object: {len(paths)} file(s), {size / 2**20:.0f} MiB")
        modules = sender_files(args.before, folder)
        storescp = StoreSCP(folder / "storescp").start()
        orthanc = None if args.no_stow else Orthanc(folder / "orthanc", free_port(), dicomweb=True).start()
        try:
            targets = [("dimse", {"ae_title": storescp.ae_title, "host": LOCALHOST, "port": storescp.port})]
            if orthanc is not None:
                targets.append(("dicomweb", {"protocol": "dicomweb", "url": orthanc.dicomweb_url}))
            for protocol, target in targets:
                for version in ("before", "now"):
                    time.sleep(0.5)  # storescp's marker commands of the last send
                    figures = send(modules[version][protocol], protocol, target, paths)
                    growth = (figures["peak"] - figures["base"]) / 2**20
                    print(f"{protocol:8} {version:6} peak growth {growth:7.1f} MiB ({growth * 2**20 / size:5.2f} x"
                          f" the object), {figures['seconds']:.1f} s, status {figures['status']}")
        finally:
            storescp.stop()
            if orthanc is not None:
                orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
