"""A custom nnU-Net v2 model (not TotalSegmentator): loaded by nnU-Net's own predictor,
its structures named by its dataset.json and coded by the labels.csv next to it.

The model is the synthetic phantom model installed as a custom model with its
structures renamed ``phantom_<name>``, so no TotalSegmentator table can code them."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys

import numpy as np
import pydantic
import pytest

from demo.phantom_model import make_custom_model
from pipeline.errors import WeightsMissingError
from pipeline.input.classify import Classification, SequenceClass
from pipeline.input.preprocess import PreprocessingMode
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.labels import read_label_table
from pipeline.model.identity import describe_model
from pipeline.model.nnunet import NnUNet
from pipeline.model.segment import make_segmenter
from pipeline.model.types import LabelMap
from pipeline.outputs.seg import encode_seg
from pipeline.process import algorithm_for
from pipeline.settings import ModelSettings, PipelineSettings
from tests.segcheck import check_seg_against_source
from tests.support.paths import REPO


@pytest.fixture(scope="module")
def custom(phantom_weights, tmp_path_factory) -> ModelSettings:
    weights = tmp_path_factory.mktemp("custom_weights")
    return ModelSettings(kind="nnunet", nnunet_model=make_custom_model(phantom_weights, weights), weights_dir=weights)


def _table_rows(settings: ModelSettings) -> dict[str, dict[str, str]]:
    with (settings.nnunet_folder / "labels.csv").open(newline="") as handle:
        return {row["Structure"]: row for row in csv.DictReader(handle)}


@pytest.mark.e2e
def test_custom_model_through_the_process_command(custom, t1_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "destination: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        f"pipeline: {{model: {{kind: nnunet, nnunet_model: '{custom.nnunet_model}',"
        f" weights_dir: '{custom.weights_dir}'}}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "process", str(t1_dir), "--output", str(tmp_path / "out"),
         "--config", str(config)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [path] = (tmp_path / "out").glob("*.dcm")
    seg = check_seg_against_source(path, t1_dir)
    rows = _table_rows(custom)
    assert len(seg.SegmentSequence) >= 1
    for segment in seg.SegmentSequence:
        row = rows[segment.SegmentLabel]  # a name from the model's dataset.json, coded by its table
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == row[
            "SegmentedPropertyTypeCodeSequence.CodeValue"]
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == row[
            "SegmentedPropertyCategoryCodeSequence.CodeValue"]
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "Dataset501_PhantomCustom"
        assert describe_model(custom).version == algorithm.AlgorithmVersion
        assert "checkpoint" in algorithm.AlgorithmVersion
    dciodvfy = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert [line for line in (dciodvfy.stdout + dciodvfy.stderr).splitlines() if line.startswith("Error")] == []


def test_structure_missing_from_the_label_table_gets_a_generic_code_and_a_warning(custom, t1_dir, tmp_path, caplog):
    table = read_label_table(custom.nnunet_folder / "labels.csv")
    del table["phantom_brain"]
    volume = read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))
    array = np.zeros((35, 256, 256), np.uint16)
    array[10:20, 100:150, 60:90] = 90
    array[3:5, 10:20, 10:20] = 2
    names = {2: "phantom_kidney_right", 90: "phantom_brain"}
    algorithm = algorithm_for(PipelineSettings(model=custom), PreprocessingMode.INVERT,
                              Classification(SequenceClass.T1, True, "test"))
    with caplog.at_level(logging.WARNING):
        seg = encode_seg(LabelMap(array, names, volume, codes=table), algorithm)
    kidney, brain = seg.SegmentSequence
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Kidney"
    assert kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert brain.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Anatomical structure"
    assert "no SNOMED CT code known for structure 'phantom_brain'" in caplog.text
    assert kidney.RecommendedDisplayCIELabValue != brain.RecommendedDisplayCIELabValue


def test_an_incomplete_model_names_the_missing_file(custom, tmp_path, t1_dir):
    broken = custom.model_copy(update={"weights_dir": tmp_path})
    shutil.copytree(custom.nnunet_folder, broken.nnunet_folder)
    (broken.nnunet_folder / "fold_0" / "checkpoint_final.pth").unlink()
    volume = read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))
    segmenter = make_segmenter(broken)
    with pytest.raises(WeightsMissingError, match=r"fold_0/checkpoint_final\.pth.*weights import"):
        segmenter.segment(volume)
    segmenter.close()


def test_another_training_of_the_model_is_another_identity(custom, tmp_path):
    retrained = custom.model_copy(update={"weights_dir": tmp_path})
    shutil.copytree(custom.nnunet_folder, retrained.nnunet_folder)
    assert describe_model(retrained) == describe_model(custom), "a copy is the same model"
    with (retrained.nnunet_folder / "fold_0" / "checkpoint_final.pth").open("ab") as handle:
        handle.write(b"\0")
    assert describe_model(retrained).version != describe_model(custom).version
    assert isinstance(make_segmenter(custom).model, NnUNet)


def test_nnunet_kind_needs_a_model_folder():
    with pytest.raises(pydantic.ValidationError, match="nnunet_model"):
        ModelSettings(kind="nnunet")
