"""The SEG encoder on a real series, with a label map placed by the test (no model)."""

import subprocess

import numpy as np
import pytest

from pipeline.errors import SegEncodingError
from pipeline.classify import Classification, SequenceClass
from pipeline.preprocess import PreprocessingMode
from pipeline.run import algorithm_for
from pipeline.seg_writer import check_seg_geometry, encode_seg
from pipeline.series import load_series
from pipeline.settings import PipelineSettings
from pipeline.volume import LabelMap, read_volume
from tests.segcheck import check_seg_against_source


T1 = Classification(SequenceClass.T1, True, "test")


def _algorithm(mode: PreprocessingMode = PreprocessingMode.INVERT_BLACK_BACKGROUND):
    return algorithm_for(PipelineSettings(), mode, T1)


@pytest.fixture(scope="module")
def volume(t1_dir):
    return read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))


def _labels(volume) -> LabelMap:
    array = np.zeros((35, 256, 256), dtype=np.uint16)
    array[10:20, 100:150, 60:90] = 90  # brain
    array[5:8, 30:40, 30:40] = 3  # kidney_right
    array[25:28, 30:40, 30:40] = 2  # kidney_left
    return LabelMap(array, {2: "kidney_right", 3: "kidney_left", 90: "brain"}, volume)


def test_seg_references_every_source_and_lies_on_its_slices(volume, t1_dir, tmp_path):
    seg = encode_seg(_labels(volume), _algorithm())
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    read = check_seg_against_source(path, t1_dir)
    assert [s.SegmentLabel for s in read.SegmentSequence] == ["kidney_right", "kidney_left", "brain"]
    # the label placed on slices 10..19 comes back on exactly those source instances
    brain = read.get_segment_numbers(segment_label="brain")[0]
    frames = [
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f, n in zip(read.PerFrameFunctionalGroupsSequence, _frame_segments(read))
        if n == brain
    ]
    expected = {volume.series.slices[k].sop_instance_uid for k in range(10, 20)}
    assert set(frames) == expected
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def _frame_segments(seg):
    return [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in seg.PerFrameFunctionalGroupsSequence]


def test_left_and_right_differ_in_their_laterality_modifier(volume):
    seg = encode_seg(_labels(volume), _algorithm())
    modifiers = {
        s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning
        for s in seg.SegmentSequence
        if "SegmentedPropertyTypeModifierCodeSequence" in s.SegmentedPropertyTypeCodeSequence[0]
    }
    assert modifiers == {"kidney_left": "Left", "kidney_right": "Right"}
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]
    assert len(set(colours)) == len(colours)


def test_a_structure_inside_an_organ_carries_its_anatomic_region_and_its_side(volume):
    array = np.zeros((35, 256, 256), dtype=np.uint16)
    array[5:8, 30:40, 30:40] = 1
    array[25:28, 30:40, 30:40] = 2
    seg = encode_seg(LabelMap(array, {1: "kidney_cyst_left", 2: "kidney_cyst_right"}, volume), _algorithm())
    sides = []
    for segment in seg.SegmentSequence:
        region = segment.AnatomicRegionSequence[0]
        assert region.CodeMeaning == "Kidney" and region.CodingSchemeDesignator == "SCT"
        sides.append(region.AnatomicRegionModifierSequence[0].CodeMeaning)
    assert sides == ["Left", "Right"]


def test_empty_prediction_gives_no_seg(volume):
    empty = LabelMap(np.zeros((35, 256, 256), np.uint16), {90: "brain"}, volume)
    assert encode_seg(empty, _algorithm()) is None


def test_same_input_same_uids_other_mode_new_uids(volume):
    labels = _labels(volume)
    first = encode_seg(labels, _algorithm())
    again = encode_seg(labels, _algorithm())
    other = encode_seg(labels, _algorithm(PreprocessingMode.INVERT))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert "inverted T1" in first.SeriesDescription
    parameters = first.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "invert_black_background" in parameters and "T1" in parameters


def test_geometry_check_catches_a_frame_off_its_source(volume):
    labels = _labels(volume)
    seg = encode_seg(labels, _algorithm())
    seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[0] += 0.5
    with pytest.raises(SegEncodingError, match="frame 1 lies at"):
        check_seg_geometry(seg, labels)
