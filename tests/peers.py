"""Real DICOM peers for the tests, each on 127.0.0.1 and a free port: Orthanc, dcmtk's
storescp, and the node itself as a subprocess. Each is started by a fixture and torn
down after it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pydicom
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA_ENV = "DICOM_NODE_TEST_DATA"  # the one setting that points at the shared MRI series


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data" / "mri")).resolve()


LOCALHOST = "127.0.0.1"
STORESCU_CONFIG = Path(__file__).with_name("storescu.cfg")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment that makes a peer's wildcard bind() a loopback bind (see bind_localhost.c)."""
    source = Path(__file__).with_name("bind_localhost.c")
    library = REPO / ".cache" / "bind_localhost.so"
    if not library.exists() or library.stat().st_mtime < source.stat().st_mtime:
        library.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    # Debian's dcmtk (also inside Orthanc) waits on Nagle's algorithm unless TCP_NODELAY is set.
    return {**os.environ, "LD_PRELOAD": str(library), "TCP_NODELAY": "1"}


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((LOCALHOST, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {LOCALHOST}:{port} after {timeout}s")


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


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


def series_uid_of(path: Path) -> str:
    """The SeriesInstanceUID of a DICOM file, or of the first file in a folder."""
    if path.is_dir():
        path = sorted(path.glob("*.dcm"))[0]
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


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

    def start(self) -> "StoreSCP":
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


class Reception(NamedTuple):
    """One C-STORE received by a StoreSCP: its file and its header (read without pixels)."""

    path: Path
    dataset: pydicom.Dataset


def _describe(receptions: list[Reception]) -> str:
    lines = []
    for number, (path, ds) in enumerate(receptions, start=1):
        referenced = ds.get("ReferencedSeriesSequence")
        source = str(referenced[0].SeriesInstanceUID) if referenced else "-"
        lines.append(f"  {number}. {path.name}: Modality {ds.get('Modality')}, SOPInstanceUID"
                     f" {ds.get('SOPInstanceUID')}, source series {source}, {path.stat().st_size} bytes")
    return "\n".join(lines) or "  (none)"


def seg_receptions(scp: StoreSCP, series_instance_uid: str | None = None) -> list[Reception]:
    """The SEGs ``scp`` received, one per C-STORE in arrival order, optionally only those
    whose source series (ReferencedSeriesSequence[0]) is ``series_instance_uid``."""
    found = []
    for path in scp.receptions():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("Modality") != "SEG":
            continue
        if series_instance_uid is not None:
            referenced = ds.get("ReferencedSeriesSequence")
            if not referenced or str(referenced[0].SeriesInstanceUID) != series_instance_uid:
                continue
        found.append(Reception(path, ds))
    return found


def assert_exactly_one_seg(scp: StoreSCP, series_instance_uid: str | None = None) -> Reception:
    """The one SEG ``scp`` received (for ``series_instance_uid``, if given); a duplicate
    delivery of the same SOP instance counts as a second SEG."""
    scp.settle()
    segs = seg_receptions(scp, series_instance_uid)
    if len(segs) != 1:
        scope = f" for series {series_instance_uid}" if series_instance_uid else ""
        everything = [Reception(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in scp.receptions()]
        raise AssertionError(
            f"expected exactly one SEG{scope} at {scp.ae_title}, got {len(segs)};"
            f" every C-STORE it received, in arrival order:\n{_describe(everything)}"
        )
    return segs[0]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information, which storescp fills in per association
    (the sender's AE title in SourceApplicationEntityTitle) rather than per object."""
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path.name}: no file meta group length where storescp writes it")
    return data[144 + int.from_bytes(data[140:144], "little"):]


def assert_no_conflicting_duplicates(scp: StoreSCP) -> None:
    """Fail if one SOPInstanceUID arrived more than once with different content."""
    scp.settle()
    by_uid: dict[str, list[Path]] = {}
    for path in scp.receptions():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        by_uid.setdefault(uid, []).append(path)
    conflicts = [
        f"  SOPInstanceUID {uid}: " + ", ".join(f"{p.name} ({p.stat().st_size} bytes)" for p in paths)
        for uid, paths in by_uid.items()
        if len({_dataset_bytes(p) for p in paths}) > 1
    ]
    if conflicts:
        raise AssertionError(f"{scp.ae_title} received different objects under the same SOPInstanceUID:\n"
                             + "\n".join(conflicts))


class Orthanc:
    """A real Orthanc (Debian package) with storage in a temporary folder.

    ``dicomweb`` loads the DICOMweb plugin (package orthanc-dicomweb) under
    ``dicomweb_url``. ``users`` (name -> password) turns HTTP basic authentication on;
    the class's own REST calls then log in as the first of them. ``lua`` is a Lua script
    Orthanc runs, e.g. a ``ReceivedInstanceFilter`` that refuses some instances.
    """

    DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

    def __init__(self, folder: Path, node_port: int, node_ae: str = "DICOMNODE", *, dicomweb: bool = False,
                 users: dict[str, str] | None = None, lua: str | None = None) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        self.url = f"http://{LOCALHOST}:{self.http_port}"
        self.process: subprocess.Popen | None = None
        self.auth: tuple[str, str] | None = next(iter(users.items())) if users else None
        self.config = {
            "Name": "test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {"node": [node_ae, LOCALHOST, node_port]},
            "Plugins": [],
            "HttpsVerifyPeers": False,
        }
        if dicomweb:
            if not self.DICOMWEB_PLUGIN.exists():
                raise RuntimeError(f"{self.DICOMWEB_PLUGIN} is missing: install orthanc-dicomweb (make peers)")
            self.config["Plugins"] = [str(self.DICOMWEB_PLUGIN)]
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if users:
            self.config["AuthenticationEnabled"] = True
            self.config["RegisteredUsers"] = dict(users)
        self.lua = lua
        if lua is not None:
            self.config["LuaScripts"] = [str(folder / "script.lua")]

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (STOW-RS posts to ``{dicomweb_url}/studies``)."""
        if "DicomWeb" not in self.config:
            raise RuntimeError("this Orthanc was started without dicomweb=True")
        return f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.lua is not None:
            (self.folder / "script.lua").write_text(self.lua)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen(
            ["Orthanc", str(config_path)], stdout=self.log, stderr=subprocess.STDOUT, env=loopback_env()
        )
        wait_for_port(self.http_port, process=self.process)
        wait_until(lambda: self._ok("/system"), 30, what="Orthanc's REST API")
        if "DicomWeb" in self.config:
            wait_until(lambda: self._ok("/dicom-web/studies"), 30, what="Orthanc's DICOMweb plugin")
        return self

    def _ok(self, path: str) -> bool:
        try:
            return requests.get(self.url + path, auth=self.auth, timeout=2).ok
        except requests.RequestException:
            return False

    def get(self, path: str):
        response = requests.get(self.url + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def get_bytes(self, path: str) -> bytes:
        response = requests.get(self.url + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.content

    def post(self, path: str, data) -> dict:
        body = data if isinstance(data, (bytes, str)) else json.dumps(data)
        response = requests.post(self.url + path, data=body, auth=self.auth, timeout=300)
        response.raise_for_status()
        return response.json()

    def upload(self, folder: Path) -> list[str]:
        ids = []
        for path in sorted(folder.glob("*.dcm")):
            ids.append(self.post("/instances", path.read_bytes())["ParentSeries"])
        return sorted(set(ids))

    def receptions(self) -> list[tuple[str, str]]:
        """(SOPClassUID, SOPInstanceUID) of every instance Orthanc received, duplicates
        included, in order: logged by ``RECEPTION_LOG`` (start it with ``lua=RECEPTION_LOG``)."""
        text = (self.folder / "orthanc.log").read_text(errors="replace")
        return [tuple(line.split("RECEIVED ", 1)[1].split()[:2]) for line in text.splitlines()  # type: ignore[misc]
                if "Lua says: RECEIVED " in line]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
            self.log.close()


# An Orthanc Lua script that logs every instance it receives (DIMSE, REST or DICOMweb),
# a duplicate too, for ``Orthanc.receptions``; it accepts every instance.
RECEPTION_LOG = """
function ReceivedInstanceFilter(dicom, origin, info)
  print("RECEIVED " .. dicom.SOPClassUID .. " " .. dicom.SOPInstanceUID)
  return true
end
"""


NODE_LOGS: list[Path] = []  # every node log of the session, scanned for patient data at the end


@dataclass
class NodeProcess:
    """``dicom-node serve`` as a subprocess with its own config and folders."""

    folder: Path
    config: dict
    process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.config["node"]["port"]

    @property
    def config_path(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.folder / "node.log"

    def start(self) -> "NodeProcess":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        if self.log_path not in NODE_LOGS:
            NODE_LOGS.append(self.log_path)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
        )
        log.close()
        wait_for_port(self.port, timeout=60, process=self.process)
        return self

    def jobs(self) -> list:
        """The node's jobs, read from its state store."""
        from dicom_node.store.state import StateStore

        state = StateStore(Path(self.config["storage"]["state_db"]))
        try:
            return state.jobs()
        finally:
            state.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=120,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def status_of(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``dicom-node status`` with ``config``; it must exit 0 with nothing on stderr."""
    result = subprocess.run([sys.executable, "-m", "dicom_node", "status", "--config", str(config), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result


def node_settled(node: NodeProcess, count: int) -> bool:
    """``count`` jobs, all ended, and no series still receiving (no job still to come)."""
    from dicom_node.store.state import TERMINAL_STATES, StateStore

    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        jobs = state.jobs()
        return len(jobs) >= count and all(j.state in TERMINAL_STATES for j in jobs) and not state.receiving_series()
    finally:
        state.close()


def node_config(folder: Path, *, destination: tuple[str, int], weights_dir: Path, **overrides) -> dict:
    config = {
        "node": {"ae_title": "DICOMNODE", "bind_address": LOCALHOST, "port": free_port()},
        "security": {"allowed_callers": [{"ae_title": "MODALITY", "host": LOCALHOST}, {"ae_title": "ORTHANC"},
                                         {"ae_title": "ECHOSCU"}]},
        "destination": {"ae_title": destination[0], "host": LOCALHOST, "port": destination[1]},
        "storage": {"spool_dir": str(folder / "spool"), "state_db": str(folder / "state.sqlite3"),
                    "min_free_bytes": 10_000_000},
        "completion": {"stable_seconds": 3, "complete_on_release": True},
        "send": {"max_attempts": 5, "retry_delay_seconds": 1, "timeout_seconds": 10},
        "pipeline": {"model": {"weights_dir": str(weights_dir), "home_dir": str(folder / "totalseg")}},
        "http": {"port": 0},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _log_has(path: Path, marker: str) -> bool:
    return path.exists() and marker in path.read_text(errors="replace")


class RedisServer:
    """Debian's redis-server on 127.0.0.1 and a free port, without persistence (a
    restart comes back empty, as a Redis without disk does)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self) -> "RedisServer":
        self.starts += 1
        log_path = self.folder / f"redis-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--bind", LOCALHOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: _log_has(log_path, "Ready to accept connections") or self.process.poll() is not None,
                   30, 0.05, "redis-server to be ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


class CeleryWorker:
    """``dicom-node worker`` as a subprocess; ``ready`` once Celery says so in its log."""

    def __init__(self, folder: Path, config: dict, name: str) -> None:
        self.folder = folder
        self.config = config
        self.name = name
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}-{self.starts}.log"

    def start(self) -> "CeleryWorker":
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / f"{self.name}.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "worker", "--config", str(config_path),
                 "--name", f"{self.name}@localhost"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            )
        NODE_LOGS.append(self.log_path)
        wait_until(lambda: _log_has(self.log_path, f"{self.name}@localhost ready.") or self.process.poll() is not None,
                   120, 0.1, f"worker {self.name} to be ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited: {self.log()[-2000:]}")
        return self

    def tasks_received(self) -> int:
        """Tasks Celery handed this worker (its log line per task)."""
        return sum(1 for line in self.log().splitlines()
                   if "Task dicom_node.segment[" in line and line.rstrip().endswith("received"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(sig)
            self.process.wait(timeout=timeout)
            self.process = None
