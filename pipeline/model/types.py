"""The model's shared types: what a request returns, who serves it, and the label map
the model stage hands to the writers.

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
import numpy as np

from pipeline.input.volume import Volume
from pipeline.labels import SegmentInfo

__all__ = ["ModelIdentity", "LabelMap", "RunReport", "ModelReply", "ModelService", "Backend", "RunnerStopped", "worker_name"]


@dataclass(frozen=True)
class ModelIdentity:
    """The model as the SEG's algorithm identification names it."""

    name: str
    version: str
    task: str


@dataclass(frozen=True)
class LabelMap:
    """A label volume on the grid of ``volume`` and the names of its labels."""

    array: np.ndarray  # (slice, row, column), integer labels, 0 = background
    names: dict[int, str]  # label id -> structure name, for every id the model knows
    volume: Volume
    codes: Mapping[str, SegmentInfo] | None = None  # the model's code table; None: TotalSegmentator's
    model: ModelIdentity | None = None  # the model that made it, as its process identified it
    report: RunReport | None = None  # what the run cost in the model process (load, forward, total)

    def __post_init__(self) -> None:
        expected = (len(self.volume.series.slices), self.volume.series.rows, self.volume.series.columns)
        if self.array.shape != expected:
            raise ValueError(f"label map shape {self.array.shape} does not match the volume {expected}")

    @property
    def present(self) -> list[int]:
        """Label ids that occur in the map, ascending (background excluded)."""
        return [int(v) for v in np.unique(self.array) if v != 0]


@dataclass(frozen=True)
class RunReport:
    """What one request cost in the process that ran it."""

    worker: str  # host:pid of the model process
    device: str
    loads: int  # model loads in that process since it started (warm: stays at 1)
    load_seconds: float  # spent loading the model for this request (0 when warm)
    forward_seconds: float  # the network's forward passes (nnU-Net's sliding window)
    total_seconds: float  # the whole request inside the model process
    # the parts around the forward pass (defaults: a worker of an earlier release sends none)
    prepare_seconds: float = 0.0  # nnU-Net's preprocessing of each case (its reader, cropping, normalisation)
    export_seconds: float = 0.0  # nnU-Net's export (logits to labels on the case's grid, written)
    started_at: float = 0.0  # the request's start and end in the model process (Unix time; 0: not sent)
    ended_at: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        """Everything but the forward pass: reorientation, resampling, I/O, loading."""
        return max(self.total_seconds - self.forward_seconds, 0.0)

    @property
    def other_seconds(self) -> float:
        """The rest of the request in the model process: the back-end's own steps around
        nnU-Net (TotalSegmentator's reorientation, resampling and postprocessing)."""
        parts = self.load_seconds + self.prepare_seconds + self.forward_seconds + self.export_seconds
        return max(self.total_seconds - parts, 0.0)


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

    def run(self, image: nib.Nifti1Image) -> ModelReply: ...  # within its deadline, else ModelTimeoutError

    def overdue(self, margin: float) -> str | None: ...  # a run more than margin s past its deadline: what

    def close(self) -> None: ...


class RunnerStopped(Exception):
    """The runner was closed while a request was in flight (a shutdown, not a failure)."""


class Backend(Protocol):
    """The model side of the runner: lives in the model process."""

    def run(self, image: nib.Nifti1Image) -> ModelReply: ...


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
