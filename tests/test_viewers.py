"""Our SEGs checked with the tools viewers are built on: dcmqi (3D Slicer's converter),
dcmjs (OHIF's DICOM library), dciodvfy (the standard's validator) and Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.input.classify import Classification, SequenceClass
from pipeline.input.preprocess import PreprocessingMode
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.labels import total_class_names
from pipeline.model.types import LabelMap
from pipeline.outputs.options import SegOptions
from pipeline.outputs.seg import encode_seg
from pipeline.process import algorithm_for
from pipeline.settings import PipelineSettings
from tests.segcheck import check_seg_against_source
from tests.support.paths import REPO
from tests.support.wait import wait_until

T1 = Classification(SequenceClass.T1, True, "test")
ALGORITHM = algorithm_for(PipelineSettings(), PreprocessingMode.INVERT_BLACK_BACKGROUND, T1)


@pytest.fixture(scope="module")
def volume(t1_dir):
    return read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))


@pytest.fixture(scope="module")
def few_labels(volume) -> LabelMap:
    array = np.zeros((35, 256, 256), np.uint16)
    array[8:20, 60:140, 80:160] = 90  # brain
    array[3:6, 30:50, 30:50] = 2  # kidney_right
    array[25:30, 30:50, 30:50] = 3  # kidney_left
    array[14, 200:210, 200:230] = 5  # liver, a single slice
    return LabelMap(array, total_class_names(), volume)


@pytest.fixture(scope="module")
def all_labels(volume) -> LabelMap:
    """All 117 TotalSegmentator structures, each a small block somewhere in the volume."""
    array = np.zeros((35, 256, 256), np.uint16)
    for label in range(1, 118):
        k, j = divmod(label - 1, 11)
        array[2 + (k % 31), 10 + 20 * j: 25 + 20 * j, 10 + 20 * (k % 12): 25 + 20 * (k % 12)] = label
    return LabelMap(array, total_class_names(), volume)


def _save(seg, path: Path) -> Path:
    seg.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=300)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_accepts_a_binary_seg_of_117_segments(all_labels, tmp_path):
    seg = encode_seg(all_labels, ALGORITHM)
    assert len(seg.SegmentSequence) == 117
    assert _dciodvfy_errors(_save(seg, tmp_path / "seg.dcm")) == []


def test_dciodvfy_on_labelmap_only_reports_the_unknown_iod(few_labels, tmp_path):
    seg = encode_seg(few_labels, ALGORITHM, SegOptions("LABELMAP"))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence][:2] == [0, 1]  # the IOD's background segment
    errors = _dciodvfy_errors(_save(seg, tmp_path / "labelmap.dcm"))
    # dicom3tools here predates the Label Map IOD: it does not know the IOD, and checks the
    # segments against the BINARY rule (numbers from 1), which the Label Map's background
    # segment 0 breaks. Nothing else may be reported.
    assert sorted(errors) == [
        "Error - Information Object Not found",
        "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item"
        " number 1 (from one) with SegmentNumber of 0",
    ], errors


def test_dcmqi_reads_our_binary_seg_back_into_our_label_volume(few_labels, volume, tmp_path):
    path = _save(encode_seg(few_labels, ALGORITHM, SegOptions(omit_empty_frames=False)), tmp_path / "seg.dcm")
    out = tmp_path / "dcmqi"
    out.mkdir()
    tool = Path(sys.executable).with_name("segimage2itkimage")
    result = subprocess.run([str(tool), "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((out / "meta.json").read_text())
    by_name = {name: label for label, name in few_labels.names.items()}
    seen = []
    for group, segments in enumerate(meta["segmentAttributes"], start=1):  # dcmqi writes a file per group
        image = sitk.ReadImage(str(out / f"{group}.nrrd"))
        assert image.GetSize() == volume.image.GetSize()
        assert np.allclose(image.GetOrigin(), volume.image.GetOrigin(), atol=1e-3)
        assert np.allclose(image.GetDirection(), volume.image.GetDirection(), atol=1e-4)
        array = sitk.GetArrayFromImage(image)
        for segment in segments:
            label = by_name[segment["SegmentLabel"]]
            assert np.array_equal(array == segment["labelID"], few_labels.array == label), segment["SegmentLabel"]
            seen.append(label)
    assert sorted(seen) == few_labels.present


def test_dcmjs_finds_every_segment_and_every_frame_reference(few_labels, volume, tmp_path):
    seg = encode_seg(few_labels, ALGORITHM)
    path = _save(seg, tmp_path / "seg.dcm")
    result = subprocess.run(["node", str(REPO / "tests" / "js" / "parse_seg.js"), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    names = [few_labels.names[label] for label in few_labels.present]
    assert [s["label"] for s in parsed["segments"]] == names
    for segment in parsed["segments"]:
        assert len(segment["color"]) == 3 and segment["type"] and segment["typeScheme"] == "SCT"
        assert segment["category"] and segment["algorithmType"] == "AUTOMATIC"
    modifiers = {s["label"]: s["modifier"] for s in parsed["segments"]}
    assert modifiers["kidney_left"] == "Left" and modifiers["kidney_right"] == "Right"
    assert modifiers["brain"] is None
    colours = [tuple(s["color"]) for s in parsed["segments"]]
    assert len(set(colours)) == len(colours), "no two segments share a colour"
    sources = {s.sop_instance_uid for s in volume.series.slices}
    assert parsed["frames"] and all(uid in sources for uid in parsed["frames"])
    assert parsed["referencedSeries"] == [volume.series.series_instance_uid]


def test_colours_are_distinct_across_all_117_structures(all_labels):
    seg = encode_seg(all_labels, ALGORITHM)
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]
    assert len(colours) == 117 and len(set(colours)) == 117


def test_uids_are_deterministic_and_change_with_the_segmentation_type(few_labels):
    binary = encode_seg(few_labels, ALGORITHM)
    again = encode_seg(few_labels, ALGORITHM)
    labelmap = encode_seg(few_labels, ALGORITHM, SegOptions("LABELMAP"))
    assert binary.SOPInstanceUID == again.SOPInstanceUID
    assert labelmap.SOPInstanceUID != binary.SOPInstanceUID


@pytest.mark.peers
def test_orthanc_round_trip_of_a_labelmap_seg(orthanc, few_labels, t1_dir, tmp_path):
    """Orthanc needs UnknownSopClassAccepted for the Label Map SOP class (the fixture sets it)."""
    from dicom_node.config import Destination
    from dicom_node.send.dimse import send_file

    assert orthanc.config["UnknownSopClassAccepted"] is True
    orthanc.upload(t1_dir)
    path = _save(encode_seg(few_labels, ALGORITHM, SegOptions("LABELMAP")), tmp_path / "labelmap.dcm")
    send_file(path, Destination(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port),
              calling_ae_title="DICOMNODE")
    sop = str(pydicom.dcmread(path).SOPInstanceUID)
    found = wait_until(lambda: orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop}}),
                       30, 0.5, "the SEG in Orthanc")
    back = tmp_path / "back.dcm"
    back.write_bytes(orthanc.get_bytes(f"/instances/{found[0]}/file"))
    check_seg_against_source(back, t1_dir)
    assert pydicom.dcmread(back).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
