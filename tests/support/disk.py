"""A small disk of its own for a test: a tmpfs mounted on a folder, filled on purpose.

Mounting needs root (CI and the development machines run as root); elsewhere the test
that needs it is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["small_disk", "fill_to"]


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int) -> Iterator[Path]:
    """``folder`` as a tmpfs of ``megabytes``, unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_to(folder: Path, free_bytes: int) -> Path:
    """A filler file that leaves about ``free_bytes`` free on ``folder``'s disk; delete it
    to give the space back."""
    filler = folder / "filler.bin"
    size = shutil.disk_usage(folder).free - free_bytes
    with open(filler, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            handle.write(chunk[: min(size, len(chunk))])
            size -= len(chunk)
    return filler
