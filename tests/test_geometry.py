"""Orientation-correct output: a label placed by the test at a known point in patient
space (LPS, mm) comes back from the SEG at that point, within half a voxel, for
sagittal, oblique and decubitus series. The label goes through the same NIfTI (RAS)
conversion as TotalSegmentator's output, so a mirrored or transposed axis anywhere on
the way would move it."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from pipeline.input.nifti import nifti_to_array, volume_to_nifti
from pipeline.labels import total_class_names
from pipeline.model.types import LabelMap
from pipeline.process import Outcome, process_series
from pipeline.settings import PipelineSettings
from tests.segcheck import check_seg_against_source, referenced_planes


class PlacingSegmenter:
    """Puts a small cube of ``label`` around a patient-space point, in RAS NIfTI space."""

    def __init__(self, point_lps: np.ndarray, label: int = 5) -> None:
        self.point_lps = point_lps
        self.label = label

    def describe(self) -> str:
        return "placing"

    def segment(self, volume):
        nifti = volume_to_nifti(volume)
        ras = self.point_lps * np.array([-1, -1, 1])
        i, j, k = np.rint(np.linalg.inv(nifti.affine) @ np.append(ras, 1))[:3].astype(int)
        data = np.zeros(nifti.shape, np.uint16)
        data[i - 2:i + 3, j - 2:j + 3, k - 1:k + 2] = self.label  # symmetric around the point
        labels = nifti_to_array(type(nifti)(data, nifti.affine), volume)
        return LabelMap(labels, total_class_names(), volume)


def _seg_centroid(seg: hd.seg.Segmentation) -> np.ndarray:
    shared = seg.SharedFunctionalGroupsSequence[0]
    row_dir, col_dir = np.split(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float), 2)
    row_spacing, col_spacing = map(float, shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    points = []
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        origin = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, cols = np.nonzero(frame)
        points += [origin + c * col_spacing * row_dir + r * row_spacing * col_dir for r, c in zip(rows, cols)]
    return np.mean(points, axis=0)


@pytest.mark.parametrize("folder", [
    "t1_philips_3t_mprage_sag",  # oblique sagittal
    "hard_j2k_lossless_t1_fl2d_sag_hfdl_derived",  # decubitus left
    "t1_siemens_3t_fl2d_sag_hfs",  # sagittal, anisotropic
])
def test_label_centroid_survives_into_the_seg(mri_dir, folder, tmp_path):
    paths = sorted((mri_dir / folder).glob("*.dcm"))
    from pipeline.input.series import load_series

    series = load_series(paths)
    middle = series.slices[len(series.slices) // 2]
    # an off-centre point, so that any flip of an axis would move it
    point = (np.asarray(middle.position)
             + 0.3 * series.columns * series.pixel_spacing[1] * np.asarray(series.row_direction)
             + 0.6 * series.rows * series.pixel_spacing[0] * np.asarray(series.column_direction))
    result = process_series(paths, PipelineSettings(), PlacingSegmenter(point))
    assert result.outcome is Outcome.SEG, result.reason
    path = tmp_path / "seg.dcm"
    result.seg.save_as(path, enforce_file_format=True)
    seg = check_seg_against_source(path, mri_dir / folder)
    voxel = np.array([series.pixel_spacing[1], series.pixel_spacing[0], series.slice_spacing])
    error = np.abs(_seg_centroid(seg) - point)
    assert np.linalg.norm(error) <= 0.5 * np.linalg.norm(voxel), (error, voxel)


@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
@pytest.mark.parametrize("source", ["legacy_converted", "enhanced_4d_last_volume"])
def test_label_centroid_survives_into_the_seg_of_a_multi_frame_source(
    mri_dir, t1_dir, tmp_path, source, segmentation_type
):
    """Multi-frame sources: each SEG frame references the one source frame it lies on,
    and the label comes back where it was placed."""
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume
    from pipeline.outputs.common import Algorithm
    from pipeline.outputs.options import SegOptions
    from pipeline.outputs.seg import encode_seg
    from tests.derived import legacy_converted

    if source == "legacy_converted":
        paths, four_d = [legacy_converted(t1_dir, tmp_path / "source")], "reject"
    else:
        paths, four_d = sorted((mri_dir / "hard_enhanced_philips_pcasl_source_plus_raw").glob("*.dcm")), "last"
    series = load_series(paths, four_d=four_d)
    middle = series.slices[len(series.slices) // 2]
    point = (np.asarray(middle.position)
             + 0.3 * series.columns * series.pixel_spacing[1] * np.asarray(series.row_direction)
             + 0.6 * series.rows * series.pixel_spacing[0] * np.asarray(series.column_direction))
    label_map = PlacingSegmenter(point).segment(read_volume(series))
    algorithm = Algorithm("test", "1", "placing", "none", "T1", "test", "Auto SEG test", "test")
    path = tmp_path / "seg.dcm"
    encode_seg(label_map, algorithm, SegOptions(segmentation_type)).save_as(path, enforce_file_format=True)

    seg = check_seg_against_source(path, paths[0].parent, sources=paths)
    used = {(s.sop_instance_uid, s.frame_number) for s in series.slices}
    referenced = [plane for frame in seg.PerFrameFunctionalGroupsSequence for plane in referenced_planes(frame)]
    assert referenced and set(referenced) <= used, "a SEG frame references a frame outside the chosen volume"
    voxel = np.array([series.pixel_spacing[1], series.pixel_spacing[0], series.slice_spacing])
    error = np.abs(_seg_centroid(seg) - point)
    assert np.linalg.norm(error) <= 0.5 * np.linalg.norm(voxel), (error, voxel)
