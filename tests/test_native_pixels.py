"""The fast read of uncompressed planes gives pydicom's pixels, value for value, and
leaves every other file to pydicom."""

from __future__ import annotations

import numpy as np
import pydicom

from pipeline.input.series import load_series
from pipeline.input.volume import native_plane, read_volume

SERIES = ("t1_siemens_3t_fl2d_sag_hfs", "t1_philips_3t_mprage_sag", "t2_siemens_3t_tse_ax_adi",
          "hard_j2k_lossless_t1_fl2d_sag_hfdl_derived")


def test_native_planes_equal_pydicoms_and_compressed_files_go_to_pydicom(mri_dir):
    fast = 0
    for name in SERIES:
        series = load_series(sorted((mri_dir / name).glob("*.dcm")))
        for slice_ in series.slices:
            plane = native_plane(slice_, series.rows, series.columns)
            compressed = pydicom.dcmread(slice_.path).file_meta.TransferSyntaxUID.is_compressed
            if plane is None:
                assert compressed or slice_.frame_number is not None, f"{slice_.path.name}: not read fast"
                continue
            assert not compressed
            expected = pydicom.dcmread(slice_.path).pixel_array
            assert plane.dtype == expected.dtype and np.array_equal(plane, expected), slice_.path.name
            fast += 1
    assert fast >= 35 + 170 + 56, "every plane of the uncompressed series was read fast"


def test_a_file_that_does_not_end_with_its_pixels_is_left_to_pydicom(mri_dir, tmp_path):
    source = sorted((mri_dir / "t1_siemens_3t_fl2d_sag_hfs").glob("*.dcm"))
    padded = tmp_path / "padded"
    padded.mkdir()
    for path in source:
        (padded / path.name).write_bytes(path.read_bytes() + b"\xfc\xff\xfc\xff" + b"OB\0\0" + (2).to_bytes(4, "little")
                                         + b"\0\0")  # a trailing padding element after the pixel data
    series = load_series(sorted(padded.glob("*.dcm")))
    assert all(native_plane(s, series.rows, series.columns) is None for s in series.slices)
    reference = read_volume(load_series(source)).array
    assert np.array_equal(read_volume(series).array, reference)
