"""The RTSTRUCT encoder on the shared T1 series segmented by the phantom model: dciodvfy,
plastimatch (an independent reader that rasterises the contours back onto the source
grid), the SEG's names and colours, and the references to the source.

``segmented_series`` (the phantom model run once per series and module) is shared with
tests/test_overlay.py and tests/test_report.py."""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from skimage.draw import polygon as fill_polygon

from pipeline.errors import PipelineError
from pipeline.input.classify import classify_series
from pipeline.input.preprocess import preprocess
from pipeline.input.series import load_series
from pipeline.input.volume import Volume, read_volume
from pipeline.labels import segment_info
from pipeline.model.segment import make_segmenter
from pipeline.model.types import LabelMap
from pipeline.outputs.common import Algorithm, OutputEncodingError
from pipeline.outputs.contours import _keyhole, _slice_polygons
from pipeline.outputs.rtstruct import check_rtstruct_geometry, encode_rtstruct
from pipeline.outputs.seg import encode_seg
from pipeline.process import algorithm_for, read_image_headers
from pipeline.settings import ModelSettings, PipelineSettings
from tests.segcheck import MR_IMAGE_CLASSES
from tests.test_viewers import _dciodvfy_errors

# oblique (4 degrees) sagittal MPRAGE, and a decubitus (HFDL) JPEG 2000 series
SERIES = ("t1_philips_3t_mprage_sag", "hard_j2k_lossless_t1_fl2d_sag_hfdl_derived")


@dataclass(frozen=True)
class Segmented:
    """A shared series as the pipeline sees it, segmented by the phantom model."""

    folder: Path
    source: Volume  # as acquired
    label_map: LabelMap  # on the preprocessed volume, as the pipeline makes it
    algorithm: Algorithm


def segmented_series(mri_dir: Path, weights: Path, home: Path) -> dict[str, Segmented]:
    """Each of ``SERIES`` classified, preprocessed by its policy and segmented by one warm
    phantom model, as ``pipeline.process.process_series`` does."""
    settings = PipelineSettings(model=ModelSettings(weights_dir=weights, home_dir=home))
    segmenter = make_segmenter(settings.model)
    found = {}
    try:
        for name in SERIES:
            paths = sorted((mri_dir / name).glob("*.dcm"))
            classification = classify_series(read_image_headers(paths))
            mode = settings.policy.mode_for(classification.sequence_class)
            source = read_volume(load_series(paths))
            options = settings.preprocessing
            prepared = source.with_array(preprocess(
                source.array, mode, clip_min=options.clip_min, clip_max=options.clip_max,
                background_percentile=options.background_percentile,
            ))
            label_map = segmenter.segment(prepared)
            algorithm = algorithm_for(settings, mode, classification, label_map.model)
            found[name] = Segmented(mri_dir / name, source, label_map, algorithm)
    finally:
        segmenter.close()
    return found


@pytest.fixture(scope="module")
def segmented(mri_dir, phantom_weights, tmp_path_factory) -> dict[str, Segmented]:
    return segmented_series(mri_dir, phantom_weights, tmp_path_factory.mktemp("totalseg_home"))


@pytest.fixture(scope="module")
def rtstructs(segmented) -> dict[str, pydicom.Dataset]:
    return {name: encode_rtstruct(case.label_map, case.algorithm) for name, case in segmented.items()}


@pytest.fixture(scope="module")
def written(rtstructs, tmp_path_factory) -> dict[str, tuple[Path, pydicom.Dataset]]:
    """Each RTSTRUCT saved once and read back once (its thousands of contours are parsed
    once for every test that reads them)."""
    folder = tmp_path_factory.mktemp("rtstruct")
    found = {}
    for name, ds in rtstructs.items():
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        found[name] = (path, pydicom.dcmread(path))
    return found


def contour_data(item: pydicom.Dataset) -> np.ndarray:
    """ContourData as (n, 3), parsed from the file's text (pydicom's DS conversion takes
    seconds for a real structure set)."""
    element = item.get_item(0x30060050)
    text = element.value if element.is_raw else "\\".join(str(v) for v in element.value).encode()
    return np.array(text.split(b"\\"), float).reshape(-1, 3)


def source_headers(folder: Path) -> list[pydicom.Dataset]:
    """The MR image headers of a source folder, read here independently of the pipeline."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    return [ds for ds in headers if ds.SOPClassUID in MR_IMAGE_CLASSES]


@pytest.mark.e2e
@pytest.mark.parametrize("name", SERIES)
def test_dciodvfy_accepts_the_rtstruct(written, name):
    assert _dciodvfy_errors(written[name][0]) == []


def _readable_copy(folder: Path, destination: Path) -> Path:
    """The source series uncompressed (same UIDs): plastimatch reads DICOM with dcmtk,
    which has no JPEG 2000 decoder."""
    destination.mkdir()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.save_as(destination / path.name, enforce_file_format=True)
    return destination


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.e2e
@pytest.mark.parametrize("name", SERIES)
def test_plastimatch_rasterises_every_structure_back_onto_our_label_map(segmented, written, name, tmp_path):
    case = segmented[name]
    path = written[name][0]
    reference = _readable_copy(case.folder, tmp_path / "source")
    out = tmp_path / "structures"
    result = subprocess.run(
        ["plastimatch", "convert", "--input", str(path), "--referenced-ct", str(reference),
         "--output-prefix", str(out), "--prefix-format", "nrrd"],
        capture_output=True, text=True, timeout=600,
    )
    # plastimatch prints the patient's metadata: show only its errors
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "rror" in line][-20:]

    grid = case.source.image
    voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0
    scored = {}
    for label in case.label_map.present:
        name_ = case.label_map.names[label]
        image = sitk.ReadImage(str(out / f"{name_}.nrrd"))
        # plastimatch rasterises on the referenced series' own grid; resampling it onto
        # ours by nearest neighbour is the identity when both agree, and shows any shift
        on_grid = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        theirs = sitk.GetArrayFromImage(on_grid) > 0
        ours = case.label_map.array == label
        if ours.sum() * voxel_ml > 1.0:
            scored[name_] = _dice(theirs, ours)
    assert scored, "no structure over 1 ml to compare"
    assert {k: v for k, v in scored.items() if v < 0.90} == {}, scored


@pytest.mark.e2e
def test_names_and_colours_read_back_equal_the_segs(segmented, written):
    for name, case in segmented.items():
        read = written[name][1]
        seg = encode_seg(case.label_map, case.algorithm)
        names = {int(r.ROINumber): str(r.ROIName) for r in read.StructureSetROISequence}
        colours = {int(r.ReferencedROINumber): tuple(int(v) for v in r.ROIDisplayColor) for r in read.ROIContourSequence}
        assert [names[n] for n in sorted(names)] == [str(s.SegmentLabel) for s in seg.SegmentSequence]
        for number, segment in zip(sorted(names), seg.SegmentSequence):
            from_seg = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
            assert np.abs(np.subtract(colours[number], from_seg)).max() <= 1, (names[number], colours[number], from_seg)
            assert colours[number] == segment_info(names[number]).rgb
        kinds = {str(o.RTROIInterpretedType) for o in read.RTROIObservationsSequence}
        assert kinds == {"ORGAN"}
        algorithms = {str(r.ROIGenerationAlgorithm) for r in read.StructureSetROISequence}
        assert algorithms == {"AUTOMATIC"}


@pytest.mark.e2e
@pytest.mark.parametrize("name", SERIES)
def test_it_references_the_source_series_and_every_contour_lies_on_its_image(segmented, written, name):
    case = segmented[name]
    read = written[name][1]
    sources = source_headers(case.folder)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert read.StudyInstanceUID == sources[0].StudyInstanceUID
    assert read.PatientID == sources[0].PatientID
    assert read.SeriesInstanceUID != sources[0].SeriesInstanceUID
    [frame] = read.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == sources[0].FrameOfReferenceUID == read.FrameOfReferenceUID
    [study] = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == sources[0].StudyInstanceUID
    [series] = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence} == set(by_uid)
    assert {str(i.ReferencedSOPClassUID) for i in series.ContourImageSequence} == {str(sources[0].SOPClassUID)}

    contours = 0
    for roi in read.ROIContourSequence:
        for item in roi.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            [image] = item.ContourImageSequence
            source = by_uid[str(image.ReferencedSOPInstanceUID)]
            points = contour_data(item)
            assert len(points) == int(item.NumberOfContourPoints) >= 3
            orientation = np.asarray(source.ImageOrientationPatient, float)
            normal = np.cross(orientation[:3], orientation[3:])
            distance = np.abs((points - np.asarray(source.ImagePositionPatient, float)) @ normal)
            assert distance.max() < 0.01, "a contour lies off the plane of the image it references"
            contours += 1
    assert contours > 0


@pytest.mark.e2e
def test_same_input_same_uids_and_every_object_type_its_own(segmented, rtstructs):
    case = segmented[SERIES[1]]
    again = encode_rtstruct(case.label_map, case.algorithm)
    first = rtstructs[SERIES[1]]
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    seg = encode_seg(case.label_map, case.algorithm)
    assert {first.SeriesInstanceUID, first.SOPInstanceUID}.isdisjoint({seg.SeriesInstanceUID, seg.SOPInstanceUID})
    other = encode_rtstruct(case.label_map, dataclasses.replace(case.algorithm, version=case.algorithm.version + "+1"))
    assert other.SeriesInstanceUID != first.SeriesInstanceUID and other.SOPInstanceUID != first.SOPInstanceUID
    assert first.SeriesNumber == int(source_headers(case.folder)[0].SeriesNumber) + 1001
    assert "RTSTRUCT" in first.SeriesDescription and len(first.SeriesDescription) <= 64


@pytest.mark.e2e
def test_the_geometry_check_catches_a_contour_off_its_image(segmented, rtstructs):
    case = segmented[SERIES[1]]
    ds = encode_rtstruct(case.label_map, case.algorithm)
    item = ds.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(item.ContourData, float).reshape(-1, 3)
    normal = case.label_map.volume.series.normal
    item.ContourData = [f"{v:.3f}" for v in (points + 0.5 * normal).ravel()]
    with pytest.raises(OutputEncodingError, match="off the plane"):
        check_rtstruct_geometry(ds, case.label_map)
    assert issubclass(OutputEncodingError, PipelineError)


@pytest.mark.e2e
def test_no_structure_gives_no_rtstruct(segmented):
    case = segmented[SERIES[1]]
    empty = LabelMap(np.zeros_like(case.label_map.array), case.label_map.names, case.label_map.volume)
    assert encode_rtstruct(empty, case.algorithm) is None


def _rasterised(polygons: list[np.ndarray], shape: tuple[int, int], combine) -> np.ndarray:
    """Pixels whose centre lies inside the polygons, the polygons of one slice combined
    as a reader does: OR (plastimatch's default) or XOR (even-odd, most viewers)."""
    out = np.zeros(shape, bool)
    for polygon in polygons:
        inside = np.zeros(shape, bool)
        rows, columns = fill_polygon(polygon[:, 0], polygon[:, 1], shape)
        inside[rows, columns] = True
        out = combine(out, inside)
    return out


def test_contours_give_back_the_mask_holes_islands_and_diagonal_touches_included():
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[6:14, 6:14] = False
    ring[8:12, 8:12] = True  # an island in the hole
    ring[4, 10] = False  # a one-pixel hole
    diagonal = np.zeros((8, 8), bool)
    diagonal[2, 2] = diagonal[3, 3] = diagonal[4, 2] = True
    rng = np.random.default_rng(15)
    masks = [ring, diagonal, *(rng.random((24, 24)) < 0.5 for _ in range(20))]
    for mask in masks:
        polygons = _slice_polygons(mask)
        joined = [_keyhole(polygons[0], polygons[1:])]  # the report's one outline per image
        for combine in (np.logical_or, np.logical_xor):  # holes as separate contours would fail OR
            assert np.array_equal(_rasterised(polygons, mask.shape, combine), mask)
            assert np.array_equal(_rasterised(joined, mask.shape, combine), mask)
    # one polygon per piece: the ring (with its two holes) and the island
    assert len(_slice_polygons(ring)) == 2


def test_the_contour_tracer_equals_scikit_image_find_contours():
    """``_contours`` is a vectorised ``skimage.measure.find_contours(image, 0.5)``: the same
    rings, from the same first vertex, in the same order (a scikit-image upgrade that
    changes either shows here). Every 3x3 interior, and random masks with holes and islands."""
    from skimage.measure import find_contours

    from pipeline.outputs.contours import _contours

    def masks():
        for bits in range(1, 1 << 9):
            image = np.zeros((5, 5), bool)
            image[1:4, 1:4] = np.array([(bits >> k) & 1 for k in range(9)], bool).reshape(3, 3)
            yield image
        rng = np.random.default_rng(7)
        for shape in ((8, 8), (12, 20), (40, 30)):
            for density in (0.2, 0.5, 0.8):
                for _ in range(20):
                    image = np.zeros(shape, bool)
                    image[1:-1, 1:-1] = rng.random((shape[0] - 2, shape[1] - 2)) < density
                    yield image

    for image in masks():
        expected = find_contours(image.astype(np.float32), 0.5)
        points, starts = _contours(image)
        traced = np.split(points, starts[1:]) if len(points) else []
        assert len(traced) == len(expected)
        for ours, theirs in zip(traced, expected):
            assert np.array_equal(ours, theirs[:-1])
