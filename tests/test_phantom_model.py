"""The synthetic phantom model trains, installs where TotalSegmentator looks, and loads."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.phantom_model import (
    TOTAL_FAST_DATASET,
    TOTAL_FAST_TRAINER,
    TOTAL_FAST_TRAINER_DIR,
    make_phantom,
    train_phantom_model,
    use_totalseg_weights,
)


def test_tiny_training_installs_a_model_totalsegmentator_can_run(tmp_path: Path) -> None:
    import torch

    weights = tmp_path / "weights"
    folder = train_phantom_model(weights, epochs=1, iterations_per_epoch=2, num_cases=4, seed=0)

    assert folder == weights / TOTAL_FAST_DATASET / TOTAL_FAST_TRAINER_DIR
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert len(labels) == 118 and labels["background"] == 0 and labels["brain"] == 90
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TOTAL_FAST_TRAINER

    # a small head phantom, on an oblique-free but non-RAS grid, through the real API
    image, _ = make_phantom(np.random.default_rng(1), (40, 50, 44), "head", "inverted_t1")
    affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    nifti = nib.Nifti1Image(image[::-1, ::-1].copy(), affine)

    use_totalseg_weights(weights, tmp_path / "totalseg_home")
    from totalsegmentator.python_api import totalsegmentator

    seg = totalsegmentator(input=nifti, output=None, task="total", fast=True, ml=True, device="cpu",
                           quiet=True, skip_saving=True, nr_thr_resamp=1, nr_thr_saving=1)
    assert seg.shape == nifti.shape
    assert np.asarray(seg.dataobj).max() <= 117
