import pytest

from pipeline.errors import SeriesError
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume


def _files(folder):
    return sorted(folder.glob("*.dcm"))


def test_t1_series_is_sorted_along_its_normal(t1_dir):
    series = load_series(_files(t1_dir))
    assert len(series.slices) == 35
    distances = [s.distance for s in series.slices]
    assert distances == sorted(distances)
    assert series.slice_spacing == pytest.approx(4.8, abs=1e-3)


def test_volume_geometry_comes_from_the_header(t1_dir):
    volume = read_volume(load_series(_files(t1_dir)))
    image = volume.image
    assert image.GetSize() == (256, 256, 35)
    first = volume.series.slices[0]
    assert image.GetOrigin() == pytest.approx(first.position)
    last = volume.series.slices[-1]
    assert image.TransformIndexToPhysicalPoint((0, 0, 34)) == pytest.approx(last.position, abs=1e-3)


def test_jpeg2000_series_decodes(mri_dir):
    volume = read_volume(load_series(_files(mri_dir / "hard_j2k_lossless_t1_fl2d_sag_hfdl_derived")))
    assert volume.array.max() > 0


def test_missing_slice_is_rejected_with_the_gap_named(mri_dir):
    with pytest.raises(SeriesError, match=r"gap of 9\.60 mm after slice 17"):
        load_series(_files(mri_dir / "hard_missing_slice_t1_fl2d_sag_hfs_derived"))


def test_three_plane_localizer_is_rejected(mri_dir):
    with pytest.raises(SeriesError, match="single-orientation"):
        load_series(_files(mri_dir / "hard_localizer_ge_3plane_phantom"))


PCASL = "hard_enhanced_philips_pcasl_source_plus_raw"


def test_enhanced_4d_series_is_rejected_naming_what_varies(mri_dir):
    with pytest.raises(SeriesError, match=r"40 repeated slice position\(s\), 6 images at each: a 4D series.*"
                                          r"TemporalPositionIndex.*pipeline\.four_d"):
        load_series(_files(mri_dir / PCASL))


@pytest.mark.parametrize("four_d, temporal_index", [("first", 1), ("last", 3)])
def test_one_volume_of_an_enhanced_4d_series_frame_by_frame(mri_dir, four_d, temporal_index):
    import pydicom

    series = load_series(_files(mri_dir / PCASL), four_d=four_d)
    assert len(series.slices) == 40 and series.multi_frame
    assert [p.name for p in series.ignored] == [
        p.name for p in _files(mri_dir / PCASL) if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID.name
        == "Raw Data Storage"
    ], "the raw data object stays out of the volume"
    header = series.slices[0].header
    frames = header.PerFrameFunctionalGroupsSequence
    for slice_ in series.slices:
        frame = frames[slice_.frame_number - 1]
        assert frame.FrameContentSequence[0].TemporalPositionIndex == temporal_index
        assert slice_.position == pytest.approx(tuple(frame.PlanePositionSequence[0].ImagePositionPatient))
    assert series.slice_spacing == pytest.approx(4.0, abs=1e-3)
    assert f"the {four_d}, by TemporalPositionIndex" in series.selection
    assert read_volume(series).image.GetSize() == (96, 96, 40)


def test_legacy_converted_multi_frame_gives_the_same_volume_as_its_single_frames(t1_dir, tmp_path):
    import numpy as np

    from tests.derived import legacy_converted

    classic = read_volume(load_series(_files(t1_dir)))
    multi = read_volume(load_series([legacy_converted(t1_dir, tmp_path)]))
    assert [s.frame_number for s in multi.series.slices] != [None] * 35
    assert np.array_equal(multi.array, classic.array)
    assert multi.image.GetOrigin() == pytest.approx(classic.image.GetOrigin())
    assert multi.image.GetSpacing() == pytest.approx(classic.image.GetSpacing())
    assert multi.image.GetDirection() == pytest.approx(classic.image.GetDirection())


def test_classic_two_echo_series_is_rejected_or_split(t1_dir, tmp_path):
    from tests.derived import two_echoes

    echo1, echo2 = two_echoes(t1_dir, tmp_path)
    with pytest.raises(SeriesError, match=r"35 repeated slice position\(s\), 2 images at each.*EchoNumbers"):
        load_series(echo1 + echo2)
    for four_d, expected in (("first", echo1), ("last", echo2)):
        series = load_series(echo1 + echo2, four_d=four_d)
        assert {s.path for s in series.slices} == set(expected)
        assert set(series.ignored) == set(echo1 + echo2) - set(expected)


def test_incomplete_4d_series_cannot_be_split(t1_dir, tmp_path):
    from tests.derived import two_echoes

    echo1, echo2 = two_echoes(t1_dir, tmp_path)
    with pytest.raises(SeriesError, match="incomplete 4D series"):
        load_series(echo1 + echo2[:-3], four_d="first")


def test_every_transfer_syntax_variant_decodes_to_the_same_pixels(mri_dir):
    import numpy as np
    import pydicom

    files = sorted((mri_dir / "hard_ts_variants_siemens_epi_mosaic_1slice").glob("*.dcm"))
    decoded = [(path.name, pydicom.dcmread(path)) for path in files]
    assert len(files) == 9
    assert len({str(ds.file_meta.TransferSyntaxUID) for _, ds in decoded}) == 7
    reference = next(ds for _, ds in decoded if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1").pixel_array
    for name, ds in decoded:
        assert np.array_equal(ds.pixel_array, reference), f"{name} ({ds.file_meta.TransferSyntaxUID.name}) differs"
