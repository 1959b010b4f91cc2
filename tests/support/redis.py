"""Redis as a peer: the broker between the node and its Celery workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import log_has, wait_until


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

    def start(self) -> RedisServer:
        self.starts += 1
        log_path = self.folder / f"redis-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--bind", LOCALHOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: log_has(log_path, "Ready to accept connections") or self.process.poll() is not None,
                   30, 0.05, "redis-server to be ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
