"""dcmtk as a peer: storescu sends, storescp (StoreSCP) receives and keeps every C-STORE,
and the LD_PRELOAD shim that keeps dcmtk's and Orthanc's listening sockets on loopback."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.paths import LOCALHOST, REPO, free_port
from tests.support.wait import wait_for_port

TESTS = REPO / "tests"
STORESCU_CONFIG = TESTS / "storescu.cfg"


def loopback_env() -> dict[str, str]:
    """Environment that makes a peer's wildcard bind() a loopback bind (see bind_localhost.c)."""
    source = TESTS / "bind_localhost.c"
    library = REPO / ".cache" / "bind_localhost.so"
    if not library.exists() or library.stat().st_mtime < source.stat().st_mtime:
        library.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    # Debian's dcmtk (also inside Orthanc) waits on Nagle's algorithm unless TCP_NODELAY is set.
    return {**os.environ, "LD_PRELOAD": str(library), "TCP_NODELAY": "1"}


def storescu(port: int, paths: list[Path] | Path, *, called: str = "DICOMNODE", calling: str = "MODALITY") -> None:
    files = [str(paths)] if isinstance(paths, Path) else [str(p) for p in paths]
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run(
        # one presentation context per (SOP class, transfer syntax): compressed files go as they are
        ["storescu", "-xf", str(STORESCU_CONFIG), "Default", "-aet", calling, "-aec", called, LOCALHOST, str(port),
         "+sd", "+r", *files],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")


def start_storescu(port: int, paths: list[Path], log: Path, *, called: str = "DICOMNODE",
                   calling: str = "MODALITY") -> subprocess.Popen:
    """storescu in the background, its verbose log (each file sent and the status answered
    for it) in ``log``; read what was acknowledged with ``acknowledged``."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            ["storescu", "-v", "-xf", str(STORESCU_CONFIG), "Default", "-aet", calling, "-aec", called, LOCALHOST,
             str(port), *map(str, paths)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=handle, stderr=subprocess.STDOUT,
        )


def acknowledged(log: str) -> list[Path]:
    """The files a storescu ``-v`` log shows answered with Success: storescu has one
    request outstanding at a time, so each response belongs to the last file it sent."""
    sent: Path | None = None
    done = []
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            sent = Path(line.removeprefix("I: Sending file: ").strip())
        elif line.startswith("I: Received Store Response (Success)") and sent is not None:
            done.append(sent)
            sent = None
    return done


class StoreSCP:
    """dcmtk storescp that keeps every C-STORE it answers as a file of its own in ``folder``.

    ``+uf`` names each file after a UID that dcmtk generates on arrival
    (``<modality>.X.<root>.<host>.<pid>.<seconds>.<counter>``), so a second delivery of
    the same SOP instance is a second file and tests can count deliveries, not instances.
    storescp writes the file under that final name, so it may still be half written; after
    each object is complete, storescp runs a command that leaves a marker of the same name
    in ``folder.done``, and only objects with a marker are listed. ``--exec-sync`` makes
    storescp wait for that command before it serves the next request, so markers are
    created in arrival order.
    """

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.folder = folder
        self.done = folder.with_name(folder.name + ".done")
        self.ae_title = ae_title
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.done.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.process = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.folder), "+uf",
             "--exec-on-reception", f"touch '{self.done}/#f'", "--exec-sync", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=loopback_env(),
        )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.settle()
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def settle(self, timeout: float = 2.0) -> None:
        """storescp answers a C-STORE before it runs the marker command: give an object
        that was just answered the moment it needs for its marker (before a count or a stop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if {p.name for p in self.folder.iterdir()} <= {m.name for m in self.done.iterdir()}:
                return
            time.sleep(0.05)

    def receptions(self) -> list[Path]:
        """One file per C-STORE received completely, in arrival order.

        Ordered by the marker's mtime; markers touched within one tick of the file
        system's clock are ordered by the counter that ends storescp's unique names.
        """
        markers = [(marker.stat().st_mtime_ns, _unique_name_counter(marker.name), marker.name)
                   for marker in self.done.iterdir()]
        return [self.folder / name for _, _, name in sorted(markers)]

    received = receptions  # the name older tests use


def _unique_name_counter(name: str) -> int:
    """The counter of a name written by storescp +uf; it grows by one per object received."""
    counter = name.rsplit(".", 1)[-1]
    if not counter.isdigit():
        raise ValueError(f"{name!r} is not a name storescp +uf writes")
    return int(counter)
