"""The overlay encoder on the shared T1 series segmented by the phantom model: dciodvfy on
every image, one image per source plane at its position, and Orthanc storing the series
and rendering a frame in which the coloured pixels are where the label map says."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.labels import segment_info
from pipeline.model.types import LabelMap
from pipeline.outputs.common import OutputEncodingError
from pipeline.outputs.overlay import (
    DISCLAIMER,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    check_overlay_geometry,
    encode_overlay,
    image_area,
)
from pipeline.outputs.rtstruct import encode_rtstruct
from pipeline.outputs.seg import encode_seg
from tests.test_rtstruct import SERIES, Segmented, segmented_series, source_headers
from tests.test_viewers import _dciodvfy_errors

pytestmark = pytest.mark.e2e

COLOURED = 8  # a pixel whose channels differ by more than this is coloured; greys differ by none


@pytest.fixture(scope="module")
def segmented(mri_dir, phantom_weights, tmp_path_factory) -> dict[str, Segmented]:
    """The phantom model's label maps, made once for this module."""
    return segmented_series(mri_dir, phantom_weights, tmp_path_factory.mktemp("totalseg_home"))


@pytest.fixture(scope="module")
def overlays(segmented) -> dict[str, list[pydicom.Dataset]]:
    return {name: encode_overlay(case.label_map, case.algorithm, source=case.source)
            for name, case in segmented.items()}


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", SERIES)
def test_one_image_per_source_plane_and_dciodvfy_accepts_every_one(segmented, overlays, name, tmp_path):
    images = overlays[name]
    sources = source_headers(segmented[name].folder)
    assert len(images) == len(sources)
    errors = {}
    for number, ds in enumerate(images, start=1):
        path = tmp_path / f"{number:04d}.dcm"
        path.write_bytes(_encoded(ds))
        found = _dciodvfy_errors(path)
        if found:
            errors[number] = found
    assert errors == {}


@pytest.mark.parametrize("name", SERIES)
def test_each_image_lies_on_its_source_plane_in_the_same_study(segmented, overlays, name):
    case = segmented[name]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_headers(case.folder)}
    first = next(iter(by_uid.values()))
    images = overlays[name]
    assert len({str(ds.SeriesInstanceUID) for ds in images}) == 1
    assert len({str(ds.SOPInstanceUID) for ds in images}) == len(images)
    for number, ds in enumerate(images, start=1):
        assert ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
        assert ds.BurnedInAnnotation == "YES"
        assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != first.SeriesInstanceUID
        assert "overlay" in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
        assert ds.InstanceNumber == number
        [reference] = ds.SourceImageSequence
        source = by_uid[str(reference.ReferencedSOPInstanceUID)]
        assert np.allclose(np.asarray(ds.ImagePositionPatient, float), np.asarray(source.ImagePositionPatient, float),
                           atol=0.01)
        assert np.allclose(np.asarray(ds.ImageOrientationPatient, float),
                           np.asarray(source.ImageOrientationPatient, float), atol=1e-4)
        assert np.allclose(np.asarray(ds.PixelSpacing, float), np.asarray(source.PixelSpacing, float))
        assert (ds.Rows, ds.Columns) == image_area(source.Rows, source.Columns)
        assert ds.SamplesPerPixel == 3 and ds.PhotometricInterpretation == "RGB"
    # slice order: the images follow the volume's slices, which the geometry check verifies
    check_overlay_geometry(images, case.label_map)


def _busiest_slice(label_map: LabelMap) -> int:
    """The slice with the most labelled pixels and, among the structures, the most kinds."""
    array = label_map.array
    kinds = np.array([len(np.unique(plane)) for plane in array])
    area = (array > 0).sum(axis=(1, 2))
    return int(np.argmax(kinds * 10**7 + area))


@pytest.mark.peers
@pytest.mark.parametrize("name", SERIES)
def test_orthanc_stores_the_series_and_its_preview_shows_the_structures_where_they_are(
    segmented, overlays, name, orthanc,
):
    case = segmented[name]
    images = overlays[name]
    ids = [orthanc.post("/instances", _encoded(ds)) for ds in images]
    [series_id] = {answer["ParentSeries"] for answer in ids}
    stored = orthanc.get(f"/series/{series_id}")
    assert len(stored["Instances"]) == len(images)
    study = orthanc.get(f"/studies/{stored['ParentStudy']}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == str(case.label_map.volume.series.study_instance_uid)

    index = _busiest_slice(case.label_map)
    tags = orthanc.get(f"/instances/{ids[index]['ID']}/simplified-tags")
    assert tags["BurnedInAnnotation"] == "YES"
    assert int(tags["InstanceNumber"]) == index + 1
    png = np.asarray(Image.open(io.BytesIO(orthanc.get_bytes(f"/instances/{ids[index]['ID']}/preview"))).convert("RGB"))
    rows, columns = case.label_map.array.shape[1:]
    assert png.shape[:2] == image_area(rows, columns)

    picture = png[:rows, :columns].astype(int)  # the source plane; legend and text lie outside it
    coloured = picture.max(axis=2) - picture.min(axis=2) > COLOURED
    labels = case.label_map.array[index]
    inside = labels > 0
    assert coloured.sum() > 100
    precision = (coloured & inside).sum() / coloured.sum()
    assert precision >= 0.99, f"{precision:.3f} of the coloured pixels lie on a structure"
    for label in np.unique(labels[inside]):
        rgb = np.array(segment_info(case.label_map.names[int(label)]).rgb)
        mask = labels == label
        if 0.4 * (rgb.max() - rgb.min()) > COLOURED + 2:  # a fill this colourful is seen as coloured
            recall = (coloured & mask).sum() / mask.sum()
            assert recall >= 0.95, f"{case.label_map.names[int(label)]}: {recall:.3f} of its pixels coloured"
        # its outline (a 4-neighbour outside it) is drawn in its own colour, exactly
        outline = mask & ~ndimage.binary_erosion(mask, border_value=0)
        assert (picture[outline] == rgb).all(axis=1).mean() >= 0.99, case.label_map.names[int(label)]
    band = png[rows:]
    assert ((band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 60)).sum() > 50, "no burned-in text"


def test_outside_the_structures_the_image_is_the_source_in_grey(segmented, overlays):
    case = segmented[SERIES[1]]
    source = case.source.array
    for index in (0, len(overlays[SERIES[1]]) // 2):
        pixels = overlays[SERIES[1]][index].pixel_array.astype(int)
        rows, columns = source.shape[1:]
        picture = pixels[:rows, :columns]
        outside = case.label_map.array[index] == 0
        assert (picture[outside].max(axis=1) == picture[outside].min(axis=1)).all(), "grey outside the structures"
        grey, value = picture[outside][:, 0], source[index][outside]
        unsaturated = (grey > 0) & (grey < 255)
        # a linear window, rounded: a straight line through (source value, grey) to within 1
        slope, intercept = np.polyfit(value[unsaturated], grey[unsaturated], 1)
        assert slope > 0
        assert np.abs(grey[unsaturated] - (slope * value[unsaturated] + intercept)).max() <= 1.0
    assert DISCLAIMER in overlays[SERIES[1]][0].ImageComments


def test_without_the_source_volume_it_decodes_the_series_again(segmented, overlays):
    case = segmented[SERIES[1]]
    again = encode_overlay(case.label_map, case.algorithm)  # the label map's own volume is the inverted one
    assert [ds.PixelData for ds in again] == [ds.PixelData for ds in overlays[SERIES[1]]]
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in overlays[SERIES[1]]]
    other = segmented[SERIES[0]]
    with pytest.raises(OutputEncodingError, match="not the volume of the label map"):
        encode_overlay(case.label_map, case.algorithm, source=other.source)


def test_uids_differ_from_the_other_objects_and_no_structure_gives_no_overlay(segmented, overlays):
    case = segmented[SERIES[1]]
    images = overlays[SERIES[1]]
    others = {encode_seg(case.label_map, case.algorithm).SeriesInstanceUID,
              encode_rtstruct(case.label_map, case.algorithm).SeriesInstanceUID}
    assert images[0].SeriesInstanceUID not in others
    empty = LabelMap(np.zeros_like(case.label_map.array), case.label_map.names, case.label_map.volume)
    assert encode_overlay(empty, case.algorithm, source=case.source) is None


def test_the_geometry_check_catches_an_image_off_its_plane(segmented, overlays):
    case = segmented[SERIES[1]]
    images = encode_overlay(case.label_map, case.algorithm, source=case.source)
    images[3].ImagePositionPatient = [float(v) + 0.5 for v in images[3].ImagePositionPatient]
    with pytest.raises(OutputEncodingError, match="overlay image 4 lies at"):
        check_overlay_geometry(images, case.label_map)
    with pytest.raises(OutputEncodingError, match="overlay images for"):
        check_overlay_geometry(images[:-1], case.label_map)
