"""Where the repository and the shared test data are, and free loopback ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA_ENV = "DICOM_NODE_TEST_DATA"  # the one setting that points at the shared MRI series
LOCALHOST = "127.0.0.1"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data" / "mri")).resolve()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]
