"""The model's shared types: what a request returns and who serves it.

Every other module of ``pipeline.model`` imports these; this module imports no
back-end, no runner and no model library, so the back-ends (``totalseg``, ``nnunet``),
the runner and the Celery messages can all depend on it without a circle.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Protocol

import nibabel as nib

from pipeline.labels import SegmentInfo

__all__ = ["ModelIdentity", "RunReport", "ModelReply", "ModelService", "Backend", "RunnerStopped", "worker_name"]


@dataclass(frozen=True)
class ModelIdentity:
    """The model as the SEG's algorithm identification names it."""

    name: str
    version: str
    task: str


@dataclass(frozen=True)
class RunReport:
    """What one request cost in the process that ran it."""

    worker: str  # host:pid of the model process
    device: str
    loads: int  # model loads in that process since it started (warm: stays at 1)
    load_seconds: float  # spent loading the model for this request (0 when warm)
    forward_seconds: float  # the network's forward passes (nnU-Net's prediction and export)
    total_seconds: float  # the whole request inside the model process

    @property
    def overhead_seconds(self) -> float:
        """Everything but the forward pass: reorientation, resampling, I/O, loading."""
        return max(self.total_seconds - self.forward_seconds, 0.0)


@dataclass(frozen=True)
class ModelReply:
    labels: nib.Nifti1Image  # on the request's grid
    names: dict[int, str]  # label id -> structure name, every id the model knows
    codes: Mapping[str, SegmentInfo] | None  # a custom model's code table; None: TotalSegmentator's
    model: ModelIdentity
    report: RunReport


class ModelService(Protocol):
    """Runs the configured model on a NIfTI image (embedded runner or remote workers)."""

    def describe(self) -> str: ...

    def run(self, image: nib.Nifti1Image) -> ModelReply: ...

    def close(self) -> None: ...


class RunnerStopped(Exception):
    """The runner was closed while a request was in flight (a shutdown, not a failure)."""


class Backend(Protocol):
    """The model side of the runner: lives in the model process."""

    def run(self, image: nib.Nifti1Image) -> ModelReply: ...


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
