"""The synthetic phantom model trains, installs where TotalSegmentator looks, and loads,
without touching the calling process's environment or nnU-Net's path globals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from demo.phantom_model import (
    TOTAL_FAST_DATASET,
    TOTAL_FAST_TRAINER,
    TOTAL_FAST_TRAINER_DIR,
    make_phantom,
    segment_with_totalseg,
    train_phantom_model,
)

pytestmark = pytest.mark.e2e

_NNUNET_PATHS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _nnunet_globals() -> dict[str, object]:
    """nnU-Net's import-time path globals, in every nnunetv2 module imported so far."""
    return {
        f"{name}.{var}": getattr(module, var)
        for name, module in list(sys.modules.items())
        if name.startswith("nnunetv2") and module is not None
        for var in _NNUNET_PATHS
        if hasattr(module, var)
    }


def test_tiny_training_installs_a_model_totalsegmentator_can_run(tmp_path: Path) -> None:
    import nnunetv2.paths  # noqa: F401  imported first, so that a rewrite of its globals would show
    import torch

    environ, nnunet_globals = dict(os.environ), _nnunet_globals()
    assert "nnunetv2.paths.nnUNet_raw" in nnunet_globals

    weights = tmp_path / "weights"
    folder = train_phantom_model(weights, epochs=1, iterations_per_epoch=2, num_cases=4, seed=0)

    assert dict(os.environ) == environ
    assert _nnunet_globals() == nnunet_globals
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

    seg = segment_with_totalseg(nifti, weights, tmp_path / "totalseg_home")
    assert seg.shape == nifti.shape
    assert np.allclose(seg.affine, affine)
    assert np.asarray(seg.dataobj).max() <= 117
    assert (tmp_path / "totalseg_home" / "config.json").is_file()
    assert dict(os.environ) == environ
    assert _nnunet_globals() == nnunet_globals
