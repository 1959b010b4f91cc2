"""Our result objects opened in OHIF v3, the viewer radiologists open: its prebuilt dist
(``make js``) beside Orthanc's DICOMweb, in headless Chromium with software WebGL.

The objects are made by the node's writers from a label map the test places on the
shared T1 series and on the oblique MPRAGE (no model runs), uploaded to Orthanc with
their source series, and opened from OHIF's study browser as a user does: a double-click
on the thumbnail, "Yes" when OHIF asks to hydrate. What OHIF then holds is compared with
the file: each SEG segment's label and its voxels on each source image (from
cornerstone's cache), each RTSTRUCT ROI's contours, the overlay's pixels, the report's
measurements; and nothing may go wrong on the way (console errors, error notifications,
failed requests). A SEG whose references name instances that are not there (made here)
must make the check fail. Screenshots go to ``.cache/artifacts/ohif-*.png``."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.chromium import start_chromium
from tests.support.ohif import OhifServer, OhifViewer, instance_key, ohif_version
from tests.support.orthanc import Orthanc
from tests.support.paths import REPO, free_port

pytestmark = pytest.mark.peers

ARTIFACTS = REPO / ".cache" / "artifacts"
OBLIQUE = "t1_philips_3t_mprage_sag"  # 4 degrees oblique, 170 slices (../shared/data/mri/MANIFEST.md)
# A neutral patient in the copies the test uploads: the screenshots are kept and shown.
PATIENT = {"PatientName": "Viewer^Test", "PatientID": "OHIF-TEST", "PatientBirthDate": ""}
SEG_KEYS = ("seg", "seg-all-frames", "seg-labelmap")


@dataclass(frozen=True)
class Uploaded:
    """One series of the test in Orthanc: its study, its objects' files by key, and
    each object's series UID."""

    study: str
    files: dict[str, list[Path]]
    series: dict[str, str]


def _label_map(volume):
    """Boxes the test places, with known gaps: a structure on the first slices, one on the
    last, one on a single slice, one on two separate pairs of slices (empty frames
    between them), one large through the middle."""
    from pipeline.labels import total_class_names
    from pipeline.model.types import LabelMap

    n, rows, columns = volume.array.shape
    array = np.zeros(volume.array.shape, np.uint16)
    array[n // 4: 3 * n // 4, rows // 3: 2 * rows // 3, columns // 3: columns // 2] = 90  # brain
    array[2:5, 20:40, 20:40] = 2  # kidney_right
    array[n - 6: n - 3, 20:40, 20:40] = 3  # kidney_left
    array[n // 2, 10:18, columns - 40: columns - 20] = 5  # liver: one slice
    array[n // 4: n // 4 + 2, rows - 40: rows - 20, 30:60] = 6  # stomach: two slices,
    array[3 * n // 4 - 2: 3 * n // 4, rows - 40: rows - 20, 30:60] = 6  # a gap, two more
    return LabelMap(array, total_class_names(), volume)


def _make_objects(source: Path, folder: Path) -> Uploaded:
    """The source series (patient neutralised, UIDs kept) and every object the writers make
    of the test's label map: the three SEG encodings, the RTSTRUCT, the overlay, the report
    (which references the BINARY SEG, as in a job that makes both) and, apart, the report
    made without a SEG (its regions outlined on the images)."""
    from pipeline.input.classify import Classification, SequenceClass
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume
    from pipeline.outputs.encode import encode_results
    from pipeline.outputs.options import OutputRequest, SegOptions
    from pipeline.outputs.report import encode_report
    from pipeline.process import algorithm_for
    from pipeline.settings import PipelineSettings

    copies = folder / "source"
    copies.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.save_as(copies / path.name)
    volume = read_volume(load_series(sorted(copies.glob("*.dcm"))))
    label_map = _label_map(volume)
    algorithm = algorithm_for(PipelineSettings(), PreprocessingMode.INVERT_BLACK_BACKGROUND,
                              Classification(SequenceClass.T1, True, "test"))
    requests = [OutputRequest("seg"), OutputRequest("seg", SegOptions(omit_empty_frames=False)),
                OutputRequest("seg", SegOptions("LABELMAP")), OutputRequest("rtstruct"), OutputRequest("overlay"),
                OutputRequest("report")]
    made = {o.key: o.datasets for o in encode_results(label_map, algorithm, requests, source=volume)}
    made["report-regions"] = (encode_report(label_map, algorithm, None),)
    made["report-regions"][0].SeriesDescription = "Auto volumes (regions, no SEG)"
    files: dict[str, list[Path]] = {"source": sorted(copies.glob("*.dcm"))}
    series: dict[str, str] = {"source": str(volume.series.slices[0].header.SeriesInstanceUID)}
    for key, datasets in made.items():
        (folder / key).mkdir()
        files[key] = []
        for index, ds in enumerate(datasets):
            files[key].append(folder / key / f"{index:04d}.dcm")
            ds.save_as(files[key][-1], enforce_file_format=True)
        series[key] = str(datasets[0].SeriesInstanceUID)
    assert len(set(series.values())) == len(series), "each object in a series of its own"
    return Uploaded(str(volume.series.slices[0].header.StudyInstanceUID), files, series)


def _negative_control(seg_path: Path, out: Path) -> Path:
    """Our BINARY SEG, except that every reference names an instance that is not there
    (new UIDs, as for instances of another copy of the series), in a series of its own."""
    seg = pydicom.dcmread(seg_path)
    others: dict[str, str] = {}
    for group in seg.PerFrameFunctionalGroupsSequence:
        for derivation in group.DerivationImageSequence:
            for item in derivation.SourceImageSequence:
                item.ReferencedSOPInstanceUID = others.setdefault(item.ReferencedSOPInstanceUID, generate_uid())
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPInstanceUID = others.setdefault(item.ReferencedSOPInstanceUID, generate_uid())
    seg.SeriesInstanceUID = generate_uid()
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.SeriesDescription = "negative control: references elsewhere"
    seg.save_as(out, enforce_file_format=True)
    return out


# -- what the files say -----------------------------------------------------------------------

@dataclass(frozen=True)
class SegFile:
    """What a SEG file holds: its segments' labels (a LABELMAP's background segment too)
    and, per label, {``SOPInstanceUID:frame`` of a source image -> the segment's voxels on it}."""

    labels: list[str]
    voxels: dict[str, dict[str, int]]


def seg_expectation(path: Path) -> SegFile:
    """From the SEG's frames and their references (BINARY: one segment per frame;
    LABELMAP: the pixel values are segment numbers, 0 the background)."""
    ds = pydicom.dcmread(path)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    binary = ds.SegmentationType == "BINARY"
    found: dict[str, dict[str, int]] = defaultdict(dict)
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        key = f"{source.ReferencedSOPInstanceUID}:{int(source.get('ReferencedFrameNumber', 1))}"
        if binary:
            counts = {int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber): int(np.count_nonzero(frame))}
        else:
            values, numbers = np.unique(frame[frame > 0], return_counts=True)
            counts = dict(zip(values.tolist(), numbers.tolist()))
        for number, voxels in counts.items():
            if voxels:
                found[labels[number]][key] = found[labels[number]].get(key, 0) + voxels
    return SegFile(sorted(labels.values()), dict(found))


def rtstruct_expectation(path: Path) -> dict[str, int]:
    """ROI name -> its number of contours."""
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    return {names[int(c.ReferencedROINumber)]: len(c.get("ContourSequence", [])) for c in ds.ROIContourSequence}


def report_expectation(path: Path) -> list[str]:
    """The tracking identifiers of the report's measurement groups (one per structure)."""
    ds = pydicom.dcmread(path)
    names = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "112039":
                names.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))
    walk(ds.ContentSequence)
    return names


# -- the checks: each returns what differs, nothing when OHIF shows the file ------------------------

def seg_problems(expected: SegFile, observed: dict | None) -> list[str]:
    """Every way in which OHIF's segmentation differs from the SEG file."""
    if observed is None:
        return ["OHIF did not open the SEG: no hydration, no segmentation"]
    problems = []
    labels = {str(index): label for index, label in observed["segments"]}
    if sorted(labels.values()) != expected.labels:
        problems.append(f"segments listed {sorted(labels.values())}, the file has {expected.labels}")
    voxels = {labels.get(index, f"#{index}"): {instance_key(image): n for image, n in per_image.items()}
              for index, per_image in (observed["voxels"] or {}).items()}
    for label, per_instance in expected.voxels.items():
        seen = voxels.get(label, {})
        if sum(seen.values()) != sum(per_instance.values()):
            problems.append(f"{label}: {sum(seen.values())} voxels in OHIF, {sum(per_instance.values())} in the file")
        elif seen != per_instance:
            moved = sorted(set(seen.items()) ^ set(per_instance.items()))[:4]
            problems.append(f"{label}: the voxels lie on other images than the file says ({moved})")
    return problems


def rtstruct_problems(expected: dict[str, int], observed: dict | None) -> list[str]:
    if observed is None or observed["contours"] is None:
        return ["OHIF did not open the RTSTRUCT: no contour segmentation"]
    labels = {str(index): label for index, label in observed["segments"]}
    seen = {labels.get(index, f"#{index}"): n for index, n in observed["contours"].items()}
    return [f"{name}: {seen.get(name, 0)} contours in OHIF, {n} in the file"
            for name, n in expected.items() if seen.get(name, 0) != n] + \
           [f"{name}: in OHIF, not in the file" for name in seen if name not in expected]


# -- the peers: one Orthanc, one OHIF, one browser for the module ------------------------------------

@pytest.fixture(scope="module")
def uploaded(tmp_path_factory, t1_dir, mri_dir):
    folder = tmp_path_factory.mktemp("ohif_objects")
    made = {"t1": _make_objects(t1_dir, folder / "t1"), "oblique": _make_objects(mri_dir / OBLIQUE, folder / "oblique")}
    negative = _negative_control(made["t1"].files["seg"][0], folder / "negative.dcm")
    return made, negative


@pytest.fixture(scope="module")
def viewer(uploaded, tmp_path_factory):
    made, negative = uploaded
    orthanc = Orthanc(tmp_path_factory.mktemp("ohif_orthanc"), node_port=free_port(), dicomweb=True).start()
    server = driver = None
    try:
        for objects in made.values():
            for paths in objects.files.values():
                for path in paths:
                    orthanc.post("/instances", path.read_bytes())
        orthanc.post("/instances", negative.read_bytes())
        server = OhifServer(orthanc.dicomweb_url).start()
        driver = start_chromium((1400, 900), webgl=True, logs=True)
        yield OhifViewer(driver, server)
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            server.stop()
        orthanc.stop()


def _open(viewer: OhifViewer, objects: Uploaded, series: str) -> dict:
    """The study in the viewer, once the source series and ``series`` are in its study
    browser; then a double-click on ``series``: its display set."""
    viewer.open_study(objects.study, [objects.series["source"], series])
    return viewer.double_click(series)


def _open_seg(viewer: OhifViewer, objects: Uploaded, series: str) -> tuple[dict | None, float]:
    """The segmentation OHIF holds after a user opens the SEG series, and the seconds from
    the double-click to the hydrated segmentation (None when OHIF never offers to open it:
    it offers to only when it found the display set the SEG references, so it is given
    5 s then, 30 s otherwise)."""
    viewer.open_study(objects.study, [objects.series["source"], series])
    started = time.monotonic()
    display_set = viewer.double_click(series)
    if not viewer.hydrate(timeout=30 if display_set["referenced"] else 5):
        return None, time.monotonic() - started
    segmentation = viewer.wait_for_segmentation()
    return segmentation, time.monotonic() - started


CASES = [(name, key) for name in ("t1", "oblique") for key in SEG_KEYS]


@pytest.mark.parametrize(("name", "key"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_ohif_shows_each_seg_segment_with_the_files_voxels_on_the_files_images(viewer, uploaded, name, key):
    objects = uploaded[0][name]
    expected = seg_expectation(objects.files[key][0])
    observed, seconds = _open_seg(viewer, objects, objects.series[key])
    _middle_screenshot(viewer, len(objects.files["source"]), f"ohif-{name}-{key}.png")
    assert seg_problems(expected, observed) == []
    assert viewer.problems() == []
    print(f"OHIF {ohif_version()} {name} {key}: hydrated in {seconds:.1f} s, {len(expected.voxels)} segments")


def test_the_seg_check_fails_for_a_seg_whose_references_name_other_instances(viewer, uploaded):
    """The negative control: the same frames, references to instances that are not there."""
    made, negative = uploaded
    expected = seg_expectation(negative)
    assert sum(map(sum, (v.values() for v in expected.voxels.values()))) > 0
    observed, _ = _open_seg(viewer, made["t1"], str(pydicom.dcmread(negative, stop_before_pixels=True).SeriesInstanceUID))
    viewer.screenshot(ARTIFACTS / "ohif-negative-control.png")
    problems = seg_problems(expected, observed)
    assert problems, "OHIF showed a SEG whose references name instances that are not there"
    print(f"negative control: {problems}")
    viewer.problems()  # whatever the page logged is the control's, not the next test's


@pytest.mark.parametrize("name", ["t1", "oblique"])
def test_ohif_shows_each_rtstruct_roi_with_the_files_contours(viewer, uploaded, name):
    objects = uploaded[0][name]
    expected = rtstruct_expectation(objects.files["rtstruct"][0])
    _open(viewer, objects, objects.series["rtstruct"])
    assert viewer.hydrate(), "OHIF did not offer to open the RTSTRUCT"
    observed = viewer.wait_for_segmentation()
    _middle_screenshot(viewer, len(objects.files["source"]), f"ohif-{name}-rtstruct.png")
    assert rtstruct_problems(expected, observed) == []
    assert viewer.problems() == []


@pytest.mark.parametrize("name", ["t1", "oblique"])
def test_ohif_shows_the_overlay_as_images_with_the_files_pixels(viewer, uploaded, name):
    objects = uploaded[0][name]
    files = objects.files["overlay"]
    _open(viewer, objects, objects.series["overlay"])
    first = viewer.viewport_image
    shown = _wait(lambda: (image := first()) and objects.series["overlay"] in image["imageId"] and image, "the overlay")
    assert shown["count"] == len(files) and shown["color"]
    viewer.scroll_to(len(files) // 2)
    middle = _wait(lambda: (image := first()) and image["index"] == len(files) // 2 and image, "the middle image")
    sop = instance_key(middle["imageId"]).split(":")[0]
    ds = next(pydicom.dcmread(p) for p in files if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == sop)
    assert (middle["rows"], middle["columns"]) == (ds.Rows, ds.Columns)
    assert middle["sum"] == int(ds.pixel_array.astype(np.int64).sum()), "OHIF's pixels are not the file's"
    viewer.screenshot(ARTIFACTS / f"ohif-{name}-overlay.png")
    assert viewer.problems() == []


def _report(viewer: OhifViewer, objects: Uploaded, name: str, key: str) -> tuple[dict, list[str]]:
    """The report's display set once OHIF placed every measurement (or gave up), and what went wrong."""
    display_set = _open(viewer, objects, objects.series[key])
    viewer.hydrate(timeout=5)  # OHIF asks only for a report it can re-create as measurements
    state = _wait(lambda: (r := viewer.report(display_set["uid"])) and r["loaded"] and (
        all(loaded for _, loaded in r["measurements"]) or viewer.driver.execute_script(
            "return (window.__testErrors || []).length")) and r, "the report")
    viewer.screenshot(ARTIFACTS / f"ohif-{name}-{key}.png")
    return state, viewer.problems()


@pytest.mark.parametrize("name", ["t1", "oblique"])
def test_ohif_opens_the_report_made_without_a_seg_with_each_structure_on_its_images(viewer, uploaded, name):
    objects = uploaded[0][name]
    state, problems = _report(viewer, objects, name, "report-regions")
    assert sorted(m for m, _ in state["measurements"]) == sorted(report_expectation(objects.files["report-regions"][0]))
    assert all(loaded for _, loaded in state["measurements"])
    assert problems == []


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "OHIF 3.13.2 fails on a TID 1500 report whose volumes reference a SEG segment and no image "
    "region: _checkIfCanAddMeasurementsToDisplaySet reads measurement.coords[0].ReferencedSOPSequence "
    "of a measurement without coordinates (TypeError, 'Something went wrong'); see docs/viewers.md"))
def test_ohif_opens_the_report_that_references_the_seg(viewer, uploaded):
    objects = uploaded[0]["t1"]
    state, problems = _report(viewer, objects, "t1", "report")
    assert sorted(m for m, _ in state["measurements"]) == sorted(report_expectation(objects.files["report"][0]))
    assert problems == []


def _middle_screenshot(viewer: OhifViewer, slices: int, name: str) -> None:
    """The middle source image (where every test label map has structures) for the artifacts."""
    viewer.scroll_to(slices // 2)
    _wait(lambda: (image := viewer.viewport_image()) and image["index"] == slices // 2, "the middle image")
    viewer.screenshot(ARTIFACTS / name)


def _wait(predicate, what: str, timeout: float = 60):
    from tests.support.wait import wait_until

    return wait_until(predicate, timeout, 0.1, what)
