"""Two more synthetic stand-ins derived from the fast phantom without training: a custom
nnU-Net "kidney tumour" model (three labels, coded by its labels.csv; its rows are the
phantom's brain, skull and spinal cord, so it finds something in brain MRI) and
TotalSegmentator's ``total_mr`` fast weights. Both run through the node's real model paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.phantom_model import (
    KIDNEY_MODEL,
    KIDNEY_SOURCE_ROWS,
    TOTAL_MR_MERGED_ROWS,
    make_kidney_model,
    make_total_mr_weights,
    model_folder,
    phantom_class_names,
    total_mr_source_rows,
)
from pipeline.input.nifti import volume_to_nifti
from pipeline.input.preprocess import PreprocessingMode, preprocess
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.labels import read_label_table, segment_info, total_class_names
from pipeline.model.identity import expected_weights
from pipeline.model.runner import ModelRunner
from pipeline.model.segment import make_segmenter
from pipeline.model.totalseg import TotalSegmentator
from pipeline.settings import ModelSettings
from tests.support.paths import REPO

KIDNEY_NAMES = {1: "kidney_right", 2: "kidney_left", 3: "kidney_tumor"}
# where TotalSegmentator 2.18 looks for task="total_mr", fast=True (task 852)
TOTAL_MR_FOLDER = ("Dataset852_TotalSegMRI_total_3mm_1088subj/"
                   "nnUNetTrainer_2000epochs_NoMirroring__nnUNetPlans__3d_fullres")


@pytest.fixture(scope="module")
def derived(phantom_weights, tmp_path_factory) -> Path:
    """Both models, built once into one weights folder."""
    weights = tmp_path_factory.mktemp("derived_weights")
    assert make_kidney_model(phantom_weights, weights) == KIDNEY_MODEL
    assert make_total_mr_weights(phantom_weights, weights) == [weights / TOTAL_MR_FOLDER]
    return weights


@pytest.fixture(scope="module")
def t1_volume(t1_dir):
    return read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))


def _inverted(volume):
    return volume.with_array(preprocess(volume.array, PreprocessingMode.INVERT_BLACK_BACKGROUND,
                                        clip_min=0, clip_max=3000, background_percentile=1))


def _seg_rows(folder: Path) -> dict[str, torch.Tensor]:
    weights = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    return {key: value for key, value in weights.items() if ".seg_layers." in key}


def test_derived_models_take_the_phantom_rows_they_name(derived, phantom_weights):
    fast = model_folder(phantom_weights)
    fast_rows = json.loads((fast / "dataset.json").read_text())["labels"]
    fast_seg = _seg_rows(fast)

    kidney = _seg_rows(derived / KIDNEY_MODEL)
    assert set(kidney) == set(fast_seg)
    for key, rows in kidney.items():
        assert rows.shape[0] == 4
        for label, name in KIDNEY_NAMES.items():
            assert torch.equal(rows[label], fast_seg[key][fast_rows[KIDNEY_SOURCE_ROWS[name]]])

    from totalsegmentator.map_to_binary import class_map

    mr_ids = {name: idx for idx, name in class_map["total_mr"].items()}
    sources = total_mr_source_rows()
    learned = set(phantom_class_names())
    assert set(sources.values()) <= learned
    assert {"brain", "spinal_cord", "liver", "spleen", "kidney_left", "kidney_right", "heart", "aorta"} <= set(sources)
    assert {sources[name] for name in TOTAL_MR_MERGED_ROWS} == set(TOTAL_MR_MERGED_ROWS.values())
    for key, rows in _seg_rows(derived / TOTAL_MR_FOLDER).items():
        assert rows.shape[0] == max(mr_ids.values()) + 1 == 51
        for name, idx in mr_ids.items():
            if name in sources:
                assert torch.equal(rows[idx], fast_seg[key][fast_rows[sources[name]]])
            elif key.endswith(".bias"):
                assert float(rows[idx]) == -100.0, name  # never predicted
            else:
                assert not rows[idx].any(), name


@pytest.mark.e2e
def test_kidney_model_labels_inverted_t1_brain_mri(derived, t1_volume):
    settings = ModelSettings(kind="nnunet", nnunet_model=KIDNEY_MODEL, weights_dir=derived)
    folder = settings.nnunet_folder
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {
        "background": 0, "kidney_right": 1, "kidney_left": 2, "kidney_tumor": 3}
    assert torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["trainer_name"] == "nnUNetTrainer"

    segmenter = make_segmenter(settings)
    try:
        label_map = segmenter.segment(_inverted(t1_volume))
    finally:
        segmenter.close()
    assert label_map.names == KIDNEY_NAMES
    assert set(label_map.present) & set(KIDNEY_NAMES), "the kidney model labels something on brain MRI"
    assert set(label_map.present) <= set(KIDNEY_NAMES)

    table = read_label_table(folder / "labels.csv")
    assert label_map.codes == table
    assert set(table) == set(KIDNEY_NAMES.values())
    for side in ("kidney_right", "kidney_left"):
        assert table[side] == segment_info(side)  # TotalSegmentator's own codes
    assert table["kidney_right"].type_modifier.value == "24028007"
    tumor = table["kidney_tumor"]
    assert (tumor.category.value, tumor.category.scheme_designator, tumor.category.meaning) == (
        "49755003", "SCT", "Morphologically Altered Structure")
    assert (tumor.property_type.value, tumor.property_type.scheme_designator, tumor.property_type.meaning) == (
        "108369006", "SCT", "Neoplasm")
    assert (tumor.region.value, tumor.region.scheme_designator, tumor.region.meaning) == ("64033007", "SCT", "Kidney")
    assert tumor.type_modifier is None and tumor.region_modifier is None
    assert len(set(info.rgb for info in table.values())) == 3


@pytest.mark.e2e
def test_total_mr_weights_pass_the_check_and_run(derived, t1_volume, tmp_path):
    settings = ModelSettings(kind="totalsegmentator", task="total_mr", fast=True, weights_dir=derived,
                             home_dir=tmp_path / "home")
    [checkpoint] = expected_weights(settings)
    assert checkpoint == derived / TOTAL_MR_FOLDER / "fold_0" / "checkpoint_final.pth"
    TotalSegmentator(settings).check_weights()
    mr_names = total_class_names("total_mr")
    labels = json.loads((derived / TOTAL_MR_FOLDER / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, **{name: idx for idx, name in mr_names.items()}}

    predictable = {idx for idx, name in mr_names.items() if name in total_mr_source_rows()}
    with ModelRunner(settings) as runner:
        for volume in (t1_volume, _inverted(t1_volume)):  # as acquired (total_mr's own way) and inverted
            reply = runner.run(volume_to_nifti(volume))
            assert reply.names == mr_names
            assert set(reply.names.values()) <= set(mr_names.values())
            found = {int(v) for v in np.unique(np.asanyarray(reply.labels.dataobj))} - {0}
            assert found, "the total_mr stand-in finds structures in T1 brain MRI"
            assert found <= predictable, "only classes with a learned row"
    assert (tmp_path / "home" / "config.json").is_file()


def test_demo_model_command_writes_both_models(phantom_weights, tmp_path):
    out = tmp_path / "weights"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "demo-model", "--output", str(out),
         "--kidney-from", str(phantom_weights), "--total-mr-from", str(phantom_weights)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for folder, extra in ((out / KIDNEY_MODEL, ["labels.csv"]), (out / TOTAL_MR_FOLDER, [])):
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(
            ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json", *extra])
        assert str(folder) in result.stdout
    assert "synthetic" in result.stdout
