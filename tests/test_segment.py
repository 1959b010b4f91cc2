"""The TotalSegmentator boundary: geometry conversion, weights check, usage statistics."""

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import SegmentationError, WeightsMissingError
from pipeline.input.nifti import nifti_to_array, volume_to_nifti
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.model.identity import expected_weights
from pipeline.model.segment import make_segmenter
from pipeline.settings import ModelSettings


@pytest.fixture(scope="module")
def volume(mri_dir):
    # oblique sagittal: the conversion must keep every voxel at its physical place
    return read_volume(load_series(sorted((mri_dir / "t1_philips_3t_mprage_sag").glob("*.dcm"))))


def test_nifti_voxels_sit_at_the_same_physical_point(volume):
    nifti = volume_to_nifti(volume)
    for index in [(0, 0, 0), (255, 0, 0), (10, 200, 169), (128, 77, 3)]:
        lps = np.asarray(volume.image.TransformIndexToPhysicalPoint(index))
        ras = nifti.affine @ np.array([*index, 1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)
        i, j, k = index
        assert nifti.get_fdata()[i, j, k] == volume.array[k, j, i]


def test_label_image_round_trips_to_slice_row_column_order(volume):
    labels = np.zeros((170, 256, 256), np.uint16)
    labels[3, 40, 200] = 7
    nifti = nib.Nifti1Image(labels.transpose(2, 1, 0).copy(), volume_to_nifti(volume).affine)
    assert np.array_equal(nifti_to_array(nifti, volume), labels)
    shifted = nib.Nifti1Image(labels.transpose(2, 1, 0).copy(), np.eye(4))
    with pytest.raises(SegmentationError, match="another grid"):
        nifti_to_array(shifted, volume)


def test_missing_weights_name_the_path_and_the_remedy(tmp_path, volume):
    settings = ModelSettings(weights_dir=tmp_path / "weights", home_dir=tmp_path / "home")
    segmenter = make_segmenter(settings)
    with pytest.raises(WeightsMissingError) as info:
        segmenter.segment(volume)  # raised in the model process, the same kind here
    segmenter.close()
    message = str(info.value)
    assert str(expected_weights(settings)[0]) in message
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in message
    assert "weights_dir" in message


@pytest.mark.e2e
def test_usage_statistics_are_off_after_a_real_run(tmp_path, phantom_weights, volume):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"totalseg_id": "x", "send_usage_stats": True, "prediction_counter": 3}))
    settings = ModelSettings(weights_dir=phantom_weights, home_dir=home)
    segmenter = make_segmenter(settings)
    label_map = segmenter.segment(volume)
    segmenter.close()
    assert label_map.array.shape == (170, 256, 256)
    assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False
