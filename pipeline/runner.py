"""A model run in a fresh process started with ``spawn``.

TotalSegmentator and nnU-Net start worker processes of their own, and a process forked
from the node's many threads (SCP, completion, worker) can inherit a held lock and hang;
a crash or leak of the model, and any environment variable or library global it sets,
also stays out of the node. The child gets the model settings and three file names
(input image, output labels, error text) and nothing else; a child that exits non-zero
or writes no labels becomes a ``SegmentationError`` with the reason it wrote.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from pipeline.errors import SegmentationError
from pipeline.nifti import nifti_to_array, volume_to_nifti
from pipeline.settings import ModelSettings
from pipeline.volume import Volume

__all__ = ["ModelChild", "run_model", "run_model_on_nifti"]

ModelChild = Callable[[dict, str, str, str], None]
"""A child entry point: (settings as JSON data, input NIfTI, output NIfTI, error file)."""


def run_model_on_nifti(image: nib.Nifti1Image, child: ModelChild, settings: ModelSettings,
                       what: str) -> nib.Nifti1Image:
    """Run ``child`` in a spawned process on ``image``; the label image it wrote, in memory."""
    with tempfile.TemporaryDirectory(prefix="dicom-node-segment-") as tmp:
        source, target, error = Path(tmp) / "image.nii", Path(tmp) / "labels.nii", Path(tmp) / "error.txt"
        nib.save(image, source)
        process = multiprocessing.get_context("spawn").Process(
            target=child, args=(settings.model_dump(mode="json"), str(source), str(target), str(error)), name=what
        )
        process.start()
        process.join()
        if process.exitcode != 0 or not target.exists():
            reason = error.read_text().strip() if error.exists() else f"exit code {process.exitcode}"
            raise SegmentationError(f"{what} failed: {reason}")
        labels = nib.load(target)
        data = np.array(np.asanyarray(labels.dataobj))  # read into memory before the folder goes
        return nib.Nifti1Image(data, labels.affine, labels.header)


def run_model(volume: Volume, child: ModelChild, settings: ModelSettings, what: str) -> np.ndarray:
    """Run ``child`` in a spawned process on the volume as NIfTI; the labels on its grid."""
    return nifti_to_array(run_model_on_nifti(volume_to_nifti(volume), child, settings, what), volume)
