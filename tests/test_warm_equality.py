"""Equality: the warm runner's label map is TotalSegmentator's own, voxel for voxel.

For each shared T1 series the node segments, the volume is prepared as the node
prepares it (inverted, black background) and segmented twice with the same phantom
weights: by TotalSegmentator's own ``totalsegmentator()`` in a fresh process
(``segment_with_totalseg``, the node's cold call) and by the warm ``ModelRunner``. Both
for the ``fast`` task (one model) and for the full ``total`` task (five part-models at
1.5 mm, merged). One runner per task serves every series, so the test also shows that
it does not load the model again.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from demo.phantom_model import make_full_total_weights, segment_with_totalseg
from pipeline.input.nifti import volume_to_nifti
from pipeline.input.preprocess import preprocess
from pipeline.input.series import assemble_series, read_headers
from pipeline.input.volume import read_volume
from pipeline.model.identity import expected_weights
from pipeline.model.runner import ModelRunner
from pipeline.settings import ModelSettings, PipelineSettings
from tests.support.paths import REPO

# the T1 series the MANIFEST says the node classifies, inverts and segments
SERIES = ("t1_siemens_3t_fl2d_sag_hfs", "t1_philips_3t_mprage_sag")
TASKS = {"fast": True, "full": False}
PHANTOM_FULL = REPO / "models" / "phantom_total_full"


@pytest.fixture(scope="module")
def full_weights(phantom_weights: Path) -> Path:
    """The five synthetic part-models of the full task (built from the fast phantom if not committed)."""
    if all(path.is_file() for path in expected_weights(ModelSettings(fast=False, weights_dir=PHANTOM_FULL))):
        return PHANTOM_FULL
    cache = REPO / ".cache" / "phantom_total_full"
    make_full_total_weights(phantom_weights, cache)
    return cache


@pytest.fixture(scope="module")
def prepared(mri_dir: Path) -> dict[str, nib.Nifti1Image]:
    """Each series as the node hands it to the model: assembled, inverted, as RAS NIfTI."""
    settings = PipelineSettings()
    options = settings.preprocessing
    images = {}
    for name in SERIES:
        headers = read_headers(sorted((mri_dir / name).glob("*.dcm")))
        volume = read_volume(assemble_series(headers, min_slices=settings.min_slices, four_d=settings.four_d))
        voxels = preprocess(volume.array, settings.policy.T1, clip_min=options.clip_min,
                            clip_max=options.clip_max, background_percentile=options.background_percentile)
        images[name] = volume_to_nifti(volume.with_array(voxels))
    return images


@pytest.fixture(scope="module", params=list(TASKS))
def task(request, phantom_weights: Path, full_weights: Path, tmp_path_factory):
    """``(settings, warm runner)`` of one task, the runner shared by every series."""
    fast = TASKS[request.param]
    settings = ModelSettings(kind="totalsegmentator", task="total", fast=fast,
                             weights_dir=(phantom_weights if fast else full_weights).resolve(),
                             home_dir=tmp_path_factory.mktemp(f"runner_home_{request.param}"))
    with ModelRunner(settings) as runner:
        yield settings, runner


def _dice(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    return {
        label: round(2.0 * np.count_nonzero((a == label) & (b == label))
                     / (np.count_nonzero(a == label) + np.count_nonzero(b == label)), 5)
        for label in labels
    }


@pytest.mark.e2e
@pytest.mark.parametrize("series", SERIES)
def test_warm_runner_equals_totalsegmentator(task, series: str, prepared, tmp_path: Path) -> None:
    settings, runner = task
    image = prepared[series]

    loads_before = runner.loads
    warm = runner.segment_nifti(image)
    reference = segment_with_totalseg(image, settings.weights_dir, tmp_path / "totalseg_home", fast=settings.fast)

    expected = np.asarray(reference.dataobj)
    found = np.asarray(warm.dataobj)
    assert np.count_nonzero(expected) > 0, "TotalSegmentator found nothing: the comparison would prove nothing"
    assert np.count_nonzero(found) > 0, "the warm runner returned an empty label map"
    assert found.shape == expected.shape == image.shape
    assert np.allclose(warm.affine, image.affine, atol=1e-4)
    assert np.array_equal(found, expected), f"labels differ; Dice per label: {_dice(found, expected)}"
    if loads_before:  # a later series: the runner kept its model(s) loaded
        assert runner.loads == loads_before


def test_full_weights_are_the_fast_phantom_resliced_into_each_part(phantom_weights: Path, full_weights: Path,
                                                                   tmp_path: Path) -> None:
    import json

    import torch
    from totalsegmentator.map_to_binary import class_map_5_parts, map_taskid_to_partname_ct
    from totalsegmentator.python_api import get_task_config

    config = get_task_config("total", fast=False, quiet=True)
    folders = make_full_total_weights(phantom_weights, tmp_path / "full")
    checkpoints = expected_weights(ModelSettings(fast=False, weights_dir=tmp_path / "full"))
    assert [folder / "fold_0" / "checkpoint_final.pth" for folder in folders] == checkpoints

    [fast_checkpoint] = expected_weights(ModelSettings(fast=True, weights_dir=phantom_weights))
    fast = torch.load(fast_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    fast_rows = json.loads((fast_checkpoint.parent.parent / "dataset.json").read_text())["labels"]
    for task_id, folder, committed in zip(config["task_id"], folders,
                                          expected_weights(ModelSettings(fast=False, weights_dir=full_weights))):
        part = class_map_5_parts[map_taskid_to_partname_ct[task_id]]
        labels = json.loads((folder / "dataset.json").read_text())["labels"]
        assert labels == {"background": 0, **{name: idx for idx, name in sorted(part.items())}}
        plans = json.loads((folder / "plans.json").read_text())
        assert plans["configurations"]["3d_fullres"]["spacing"] == [config["resample"]] * 3
        checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == config["trainer"]
        rows = [fast_rows[name] for name, _ in sorted(labels.items(), key=lambda item: item[1])]
        for key, value in checkpoint["network_weights"].items():
            expected = fast[key][rows] if ".seg_layers." in key else fast[key]
            assert torch.equal(value, expected), key
        # the committed weight set is what the function writes from the committed fast phantom
        assert committed.read_bytes() == (folder / "fold_0" / "checkpoint_final.pth").read_bytes()
