import pytest

from pipeline.errors import SeriesError
from pipeline.series import load_series
from pipeline.volume import read_volume


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


def test_raw_data_is_left_out_of_the_volume(mri_dir):
    with pytest.raises(SeriesError, match="Enhanced MR"):
        load_series(_files(mri_dir / "hard_enhanced_philips_pcasl_source_plus_raw"))


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
