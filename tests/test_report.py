"""The volume report on the shared T1 series segmented by the phantom model: dciodvfy,
and each structure's volume read back by highdicom's SR reader and by dcmqi's
tid1500reader, against the voxel count times the voxel volume computed here from the
source headers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pipeline.model.types import LabelMap
from pipeline.outputs.common import OutputEncodingError
from pipeline.outputs.options import SegOptions
from pipeline.outputs.report import COMPREHENSIVE_3D_SR_STORAGE, encode_report
from pipeline.outputs.rtstruct import encode_rtstruct
from pipeline.outputs.seg import encode_seg
from tests.test_rtstruct import SERIES, Segmented, segmented_series, source_headers
from tests.test_viewers import _dciodvfy_errors

pytestmark = pytest.mark.e2e

# with the SEG on both series; without it (the source images referenced) on the small one
VARIANTS = [(SERIES[0], True), (SERIES[1], True), (SERIES[1], False)]
VARIANT_IDS = [f"{name}-{'seg' if with_seg else 'images'}" for name, with_seg in VARIANTS]


@pytest.fixture(scope="module")
def segmented(mri_dir, phantom_weights, tmp_path_factory) -> dict[str, Segmented]:
    """The phantom model's label maps, made once for this module."""
    return segmented_series(mri_dir, phantom_weights, tmp_path_factory.mktemp("totalseg_home"))


@pytest.fixture(scope="module")
def segs(segmented) -> dict[str, pydicom.Dataset]:
    return {name: encode_seg(case.label_map, case.algorithm) for name, case in segmented.items()}


@pytest.fixture(scope="module")
def reports(segmented, segs, tmp_path_factory) -> dict[tuple[str, bool], Path]:
    folder = tmp_path_factory.mktemp("reports")
    written = {}
    for name, with_seg in VARIANTS:
        case = segmented[name]
        report = encode_report(case.label_map, case.algorithm, segs[name] if with_seg else None)
        path = folder / f"{name}-{with_seg}.dcm"
        report.save_as(path, enforce_file_format=True)
        written[(name, with_seg)] = path
    return written


def expected_volumes(folder: Path, label_map: LabelMap) -> dict[str, float]:
    """Structure name -> voxel count x voxel volume (ml), the voxel's size from the source
    headers: PixelSpacing, and the distance between the first and last slice over the gaps."""
    headers = source_headers(folder)
    orientation = np.asarray(headers[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = sorted(float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds in headers)
    spacing = (along[-1] - along[0]) / (len(along) - 1)
    row, column = (float(v) for v in headers[0].PixelSpacing)
    counts = np.bincount(label_map.array.ravel())
    return {label_map.names[label]: counts[label] * row * column * spacing / 1000.0 for label in label_map.present}


@pytest.mark.parametrize(("name", "with_seg"), VARIANTS, ids=VARIANT_IDS)
def test_dciodvfy_accepts_the_report(reports, name, with_seg):
    assert _dciodvfy_errors(reports[(name, with_seg)]) == []


@pytest.mark.parametrize(("name", "with_seg"), VARIANTS, ids=VARIANT_IDS)
def test_highdicom_reads_back_each_structures_volume(segmented, segs, reports, name, with_seg):
    case = segmented[name]
    expected = expected_volumes(case.folder, case.label_map)
    report = hd.sr.srread(reports[(name, with_seg)])
    assert report.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE
    assert report.StudyInstanceUID == case.label_map.volume.series.study_instance_uid
    groups = report.content.get_volumetric_roi_measurement_groups()
    found = {}
    for group in groups:
        [volume] = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "ml" and volume.unit.scheme_designator == "UCUM"
        found[str(group.tracking_identifier)] = volume.value
        if with_seg:
            segment = group.referenced_segment
            assert segment.referenced_sop_instance_uid == segs[name].SOPInstanceUID
            [number] = segment.referenced_segment_numbers
            labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in segs[name].SegmentSequence}
            assert labels[int(number)] == str(group.tracking_identifier)
        else:
            assert group.reference_type == codes.DCM.ImageRegion
    assert set(found) == set(expected)
    for structure, value in found.items():
        assert value == pytest.approx(expected[structure], rel=1e-3), structure


def test_dcmqi_reads_the_same_volumes_and_segment_references(segmented, segs, reports, tmp_path):
    name = SERIES[0]
    case = segmented[name]
    out = tmp_path / "measurements.json"
    tool = Path(sys.executable).with_name("tid1500reader")
    result = subprocess.run([str(tool), "--inputDICOM", str(reports[(name, True)]), "--outputMetadata", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metadata = json.loads(out.read_text())
    expected = expected_volumes(case.folder, case.label_map)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in segs[name].SegmentSequence}
    found = {}
    for group in metadata["Measurements"]:
        [item] = [m for m in group["measurementItems"] if m["quantity"]["CodeValue"] == "118565006"]
        assert item["units"]["CodeValue"] == "ml"
        found[group["TrackingIdentifier"]] = float(item["value"])
        assert labels[int(group["ReferencedSegment"])] == group["TrackingIdentifier"]
        assert group["SourceSeriesForImageSegmentation"] == case.label_map.volume.series.series_instance_uid
    assert set(found) == set(expected)
    for structure, value in found.items():
        assert value == pytest.approx(expected[structure], rel=1e-3), structure


def test_without_the_seg_each_structure_is_outlined_on_the_source_images_it_lies_on(segmented, reports):
    case = segmented[SERIES[1]]
    report = hd.sr.srread(reports[(SERIES[1], False)])
    series = case.label_map.volume.series
    index_of = {s.sop_instance_uid: k for k, s in enumerate(series.slices)}
    by_name = {name: label for label, name in case.label_map.names.items()}
    for group in report.content.get_volumetric_roi_measurement_groups():
        label = by_name[str(group.tracking_identifier)]
        outlined = set()
        for region in group.roi:
            assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            points = np.asarray(region.GraphicData, float).reshape(-1, 2)
            assert np.array_equal(points[0], points[-1]), "an outline must be closed"
            [source] = region.ContentSequence  # the image the outline is drawn on
            outlined.add(index_of[str(source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)])
        on = {k for k in range(len(series.slices)) if (case.label_map.array[k] == label).any()}
        assert outlined == on, group.tracking_identifier


def test_same_input_same_uids_other_input_other_uids(segmented, segs):
    case = segmented[SERIES[1]]
    seg = segs[SERIES[1]]
    first = encode_report(case.label_map, case.algorithm, seg)
    again = encode_report(case.label_map, case.algorithm, seg)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    labelmap_seg = encode_seg(case.label_map, case.algorithm, SegOptions("LABELMAP"))
    on_labelmap = encode_report(case.label_map, case.algorithm, labelmap_seg)  # other references, other content
    other = encode_report(case.label_map, dataclasses.replace(case.algorithm, version=case.algorithm.version + "+1"),
                          seg)
    rtstruct = encode_rtstruct(case.label_map, case.algorithm)
    uids = [first.SOPInstanceUID, on_labelmap.SOPInstanceUID, other.SOPInstanceUID, seg.SOPInstanceUID,
            rtstruct.SOPInstanceUID]
    assert len(set(uids)) == len(uids)
    assert first.SeriesNumber == int(source_headers(case.folder)[0].SeriesNumber) + 1003
    assert "volumes" in first.SeriesDescription and len(first.SeriesDescription) <= 64


def test_a_seg_of_other_structures_is_refused(segmented):
    case = segmented[SERIES[1]]
    fewer = case.label_map.array.copy()
    fewer[fewer == case.label_map.present[0]] = 0
    other = encode_seg(LabelMap(fewer, case.label_map.names, case.label_map.volume), case.algorithm)
    with pytest.raises(OutputEncodingError, match="not the structures of this label map"):
        encode_report(case.label_map, case.algorithm, other)
    empty = LabelMap(np.zeros_like(case.label_map.array), case.label_map.names, case.label_map.volume)
    assert encode_report(empty, case.algorithm) is None
