"""The node as a peer: ``dicom-node serve`` and ``dicom-node worker`` as subprocesses, the
config they run with, and the one ``node`` fixture factory the test modules share."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import log_has, wait_for_port, wait_until

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

    def start(self) -> NodeProcess:
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


def node_config(folder: Path, *, destination: tuple[str, int], weights_dir: Path, **overrides: Any) -> dict:
    config = {
        "node": {"ae_title": "DICOMNODE", "bind_address": LOCALHOST, "port": free_port()},
        "security": {"allowed_callers": [{"ae_title": "MODALITY", "host": LOCALHOST}, {"ae_title": "ORTHANC"},
                                         {"ae_title": "ECHOSCU"}]},
        "destination": {"ae_title": destination[0], "host": LOCALHOST, "port": destination[1]},
        "storage": {"spool_dir": str(folder / "spool"), "state_db": str(folder / "state.sqlite3"),
                    "min_free_bytes": 10_000_000},
        # a series known not whole fails 1 s after its timer (the default waits 600 s for the sender's retry)
        "completion": {"stable_seconds": 3, "complete_on_release": True, "incomplete_grace_seconds": 1},
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


UI_TOKEN = "status-page-action-token-0123456789"  # the status page's action token in tests
UI_READ_TOKEN = "status-page-read-only-token-0123456789"  # and its read-only token


def ui_http(folder: Path, port: int | None = None, **settings: Any) -> dict:
    """``http`` settings with the status page on: its action and read-only tokens
    (``UI_TOKEN``, ``UI_READ_TOKEN``) written to files in ``folder``, a free port, and
    ``settings`` on top (``node_config(..., http=ui_http(folder))``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ui.token").write_text(UI_TOKEN + "\n")
    (folder / "ui-read.token").write_text(UI_READ_TOKEN + "\n")
    return {"port": port or free_port(), "ui": True, "ui_token_file": str(folder / "ui.token"),
            "ui_read_token_file": str(folder / "ui-read.token"), **settings}


def node_fixture(**overrides: Any) -> Callable[..., Iterator[NodeProcess]]:
    """A module's ``node`` fixture (``node = node_fixture(send={...})``): the node, not yet
    started, sending to the module's ``pacs`` with the phantom weights and ``overrides``
    (as node_config takes them); killed after the test if it still runs."""

    @pytest.fixture
    def node(tmp_path: Path, pacs: Any, phantom_weights: Path) -> Iterator[NodeProcess]:
        process = NodeProcess(tmp_path / "node", node_config(
            tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=phantom_weights,
            **copy.deepcopy(overrides),
        ))
        yield process
        if process.process is not None:
            process.stop(signal.SIGKILL)

    return node


class CeleryWorker:
    """``dicom-node worker`` as a subprocess; ``ready`` once Celery says so in its log."""

    def __init__(self, folder: Path, config: dict, name: str, args: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.config = config
        self.name = name
        self.args = args  # more options of ``dicom-node worker`` (``--slots 1``)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}-{self.starts}.log"

    def start(self) -> CeleryWorker:
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / f"{self.name}.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "worker", "--config", str(config_path),
                 "--name", f"{self.name}@localhost", *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            )
        NODE_LOGS.append(self.log_path)
        wait_until(lambda: log_has(self.log_path, f"{self.name}@localhost ready.") or self.process.poll() is not None,
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
