"""The SEG encoder on a real series, with a label map placed by the test (no model)."""

import dataclasses
import hashlib
import io
import json
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.sr.codedict import codes

from dicom_node.weights import import_weights
from pipeline.errors import SegEncodingError
from pipeline.input.classify import Classification, SequenceClass, classify_series
from pipeline.input.preprocess import PreprocessingMode
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.model.identity import describe_model, expected_weights
from pipeline.model.types import LabelMap
from pipeline.outputs.common import REPLACES, Algorithm, algorithm_parameters, parameter_value
from pipeline.outputs.options import SegOptions
from pipeline.outputs.seg import check_seg_geometry, encode_seg
from pipeline.process import algorithm_for, process_series, read_image_headers
from pipeline.settings import ModelSettings, PipelineSettings, PreprocessingSettings
from tests.segcheck import check_seg_against_source
from tests.test_viewers import _dciodvfy_errors
from tests.test_worker import FakeSegmenter

T1 = Classification(SequenceClass.T1, True, "test")


def _algorithm(mode: PreprocessingMode = PreprocessingMode.INVERT_BLACK_BACKGROUND):
    return algorithm_for(PipelineSettings(), mode, T1)


@pytest.fixture(scope="module")
def volume(t1_dir):
    return read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))


def _labels(volume) -> LabelMap:
    array = np.zeros((len(volume.series.slices), 256, 256), dtype=np.uint16)
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
    assert _dciodvfy_errors(path) == []


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


def _uids(seg) -> tuple[str, str]:
    return str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID)


def test_the_uids_name_everything_that_decides_the_content(volume, t1_dir):
    """Same input, same UIDs; any one difference in what decides the content, both UIDs new."""
    labels = _labels(volume)
    algorithm = _algorithm()
    first = _uids(encode_seg(labels, algorithm))
    assert _uids(encode_seg(labels, _algorithm())) == first

    def changed(preprocessing: dict) -> Algorithm:
        configured = PipelineSettings(preprocessing=PreprocessingSettings(**preprocessing))
        return algorithm_for(configured, PreprocessingMode.INVERT_BLACK_BACKGROUND, T1)

    one_less = read_volume(load_series(sorted(t1_dir.glob("*.dcm"))[1:]))
    variants = {
        "one source instance fewer": encode_seg(_labels(one_less), algorithm),
        "clip_max": encode_seg(labels, changed({"clip_max": 2500})),
        "percentile": encode_seg(labels, changed({"background_percentile": 2})),
        "segmentation type": encode_seg(labels, algorithm, SegOptions("LABELMAP")),
        "omit_empty_frames": encode_seg(labels, algorithm, SegOptions(omit_empty_frames=False)),
        "model version": encode_seg(labels, dataclasses.replace(algorithm, version=algorithm.version + "+1")),
    }
    for what, seg in variants.items():
        series_uid, sop_uid = _uids(seg)
        assert series_uid != first[0] and sop_uid != first[1], what
    assert len({_uids(seg) for seg in variants.values()}) == len(variants)


def test_the_totalsegmentator_version_names_its_weights(phantom_weights, tmp_path):
    """The checkpoint's SHA-256 as ``weights import`` recorded it, else as hashed; other
    weights, another version (and so other SEG UIDs)."""
    assert describe_model(ModelSettings(weights_dir=tmp_path / "none")).version.endswith("checkpoint not installed")
    model = ModelSettings(weights_dir=tmp_path / "weights")
    import_weights(phantom_weights, model.weights_dir)
    [checkpoint] = expected_weights(model)
    real = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert describe_model(model).version.endswith(f"; checkpoint {real[:12]}")

    manifest_path = model.weights_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    [entry] = manifest.values()
    assert entry["checkpoints"] == {"fold_0/checkpoint_final.pth": real}
    entry["checkpoints"]["fold_0/checkpoint_final.pth"] = "f" * 64  # the recorded digest is the one used
    manifest_path.write_text(json.dumps(manifest))
    stamp = checkpoint.stat().st_mtime_ns
    os.utime(manifest_path, ns=(stamp + 10**9, stamp + 10**9))
    assert describe_model(model).version.endswith("; checkpoint ffffffffffff")

    with checkpoint.open("ab") as handle:  # replaced by hand after the import: hashed again
        handle.write(b"\0")
    os.utime(checkpoint, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))
    retrained = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert retrained != real
    assert describe_model(model).version.endswith(f"; checkpoint {retrained[:12]}")


def test_a_seg_that_replaces_an_earlier_one_says_so_with_the_same_uids(t1_dir):
    paths = sorted(t1_dir.glob("*.dcm"))
    earlier = "1.2.826.0.1.3680043.8.498.12345"
    plain = process_series(paths, PipelineSettings(), FakeSegmenter(90)).seg
    again = process_series(paths, PipelineSettings(), FakeSegmenter(90), supersedes=earlier).seg
    assert _uids(again) == _uids(plain), "the superseded SEG is not content"
    assert again.SeriesDescription == REPLACES + plain.SeriesDescription
    assert len(again.SeriesDescription) <= 64 and "black bg" in again.SeriesDescription
    assert again.ContentDescription.startswith("replaces earlier SEG; T1; invert_black_background")
    assert earlier in again.ImageComments and earlier not in plain.ImageComments
    assert not plain.SeriesDescription.startswith(REPLACES)
    same = process_series(paths, PipelineSettings(), FakeSegmenter(90), supersedes=plain.SeriesInstanceUID).seg
    assert same.SeriesDescription == plain.SeriesDescription, "the same content replaces nothing but itself"


def _parsed_parameters(seg: pydicom.Dataset) -> dict[str, str]:
    sequence = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    return hd.AlgorithmIdentificationSequence.from_sequence(sequence).parameters


def test_every_shared_series_reason_reads_back_from_the_seg(volume, mri_dir):
    """The classifier's reasons (commas, parentheses, '=') survive highdicom's parser, and the
    exact text is in ImageComments."""
    labels = _labels(volume)
    folders = sorted(p for p in mri_dir.iterdir() if p.is_dir())
    assert len(folders) >= 9
    made_safe = 0
    for folder in folders:
        classification = classify_series(read_image_headers(sorted(folder.glob("*.dcm"))))
        made_safe += parameter_value(classification.reason) != classification.reason
        algorithm = dataclasses.replace(_algorithm(), classification=classification.reason)
        buffer = io.BytesIO()
        encode_seg(labels, algorithm).save_as(buffer, enforce_file_format=True)
        seg = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        parameters = _parsed_parameters(seg)
        assert parameters["classification"] == parameter_value(classification.reason), folder.name
        assert parameters["preprocessing"] == "invert_black_background"
        assert (parameters["clip_min"], parameters["clip_max"], parameters["background_percentile"]) == (
            "0.0", "3000.0", "1.0")
        assert f"Classification: {classification.reason}" in seg.ImageComments.splitlines(), folder.name
    assert made_safe, "some reasons hold commas: the ImageComments path is exercised"


_text = st.text(max_size=200)
_number = st.none() | st.floats()


@settings(max_examples=300, deadline=None)
@given(reason=_text, task=_text, preprocessing=_text, sequence_class=_text,
       clip_min=_number, clip_max=_number, percentile=_number)
def test_any_parameter_values_round_trip_through_highdicom(
    reason, task, preprocessing, sequence_class, clip_min, clip_max, percentile
):
    algorithm = Algorithm("model", "1", task, preprocessing, sequence_class, reason, "Auto SEG test", "test",
                          clip_min, clip_max, percentile)
    parameters = algorithm_parameters(algorithm)
    sequence = hd.AlgorithmIdentificationSequence(
        name="model", family=codes.cid7162.ArtificialIntelligence, version="1", parameters=parameters
    )
    assert hd.AlgorithmIdentificationSequence.from_sequence(sequence).parameters == parameters
    assert parameters["classification"] == _expected_value(reason)
    assert parameters["task"] == _expected_value(task)
    for key, value in (("clip_min", clip_min), ("clip_max", clip_max), ("background_percentile", percentile)):
        assert parameters.get(key) == (None if value is None else str(value))


def _expected_value(text: str) -> str:
    """The value readers get: the text with ',' ';', '=' ':', backslash '/', control characters ' '."""
    out = []
    for char in text:
        if char in ",=\\":
            out.append({",": ";", "=": ":", "\\": "/"}[char])
        elif ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            out.append(" ")
        else:
            out.append(char)
    return "".join(out).strip(" ")


_DESCRIPTIONS = st.sampled_from(["t1_mprage_sag", "T2 TSE, fat sat", "FLAIR=3D", "DWI b=1000", "ep2d, PERF", "", "Ωμέγα"])


@st.composite
def _mr_headers(draw) -> list[pydicom.Dataset]:
    """A small series of MR headers with whatever the classifier reads, in any combination."""
    headers = []
    orientation = draw(st.sampled_from([[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1]]))
    fields = {
        "RepetitionTime": draw(st.none() | st.floats(1, 20000)),
        "EchoTime": draw(st.none() | st.floats(0.5, 300)),
        "InversionTime": draw(st.none() | st.floats(0, 3000)),
        "FlipAngle": draw(st.none() | st.floats(1, 180)),
        "ScanningSequence": draw(st.none() | st.sampled_from(["GR", "SE", "IR", "EP", ["GR", "IR"], ["SE", "IR"]])),
        "SequenceVariant": draw(st.none() | st.sampled_from(["SP", "MP", "SK", ["SK", "SP", "MP"], "NONE"])),
        "SeriesDescription": draw(st.none() | _DESCRIPTIONS),
        "ImageType": draw(st.sampled_from([["ORIGINAL", "PRIMARY", "M", "ND"], ["DERIVED", "SECONDARY", "MPR"],
                                           ["ORIGINAL", "PRIMARY", "PHASE"], ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                                           ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]])),
        "MRAcquisitionType": draw(st.none() | st.sampled_from(["2D", "3D"])),
    }
    for index in range(draw(st.integers(1, 4))):
        ds = pydicom.Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [0, 0, float(index)]
        for key, value in fields.items():
            if value is not None:
                setattr(ds, key, value)
        headers.append(ds)
    return headers


@settings(max_examples=200, deadline=None)
@given(headers=_mr_headers())
def test_every_reason_the_classifier_gives_reads_back_through_highdicom(headers):
    from pipeline.input.classify import classify_series

    reason = classify_series(headers).reason
    algorithm = Algorithm("model", "1", "total (fast)", "invert_black_background", "T1", reason, "Auto SEG test",
                          "test", 0.0, 3000.0, 1.0)
    sequence = hd.AlgorithmIdentificationSequence(
        name="model", family=codes.cid7162.ArtificialIntelligence, version="1",
        parameters=algorithm_parameters(algorithm),
    )
    read_back = hd.AlgorithmIdentificationSequence.from_sequence(sequence).parameters
    assert read_back["classification"] == _expected_value(reason)
