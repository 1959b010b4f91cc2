"""The 3D volume of a series, with its geometry (LPS), never separated from it.

Pixels are decoded with pydicom (pylibjpeg / gdcm handle the compressed transfer
syntaxes), each file once, slice by slice (or frame by frame) in the ``Series`` order,
each plane's modality LUT (rescale slope and intercept) is applied, and the result becomes a SimpleITK image whose origin, spacing
and direction come from the validated header geometry. Slice ``k`` of the array is
``series.slices[k]``: this correspondence is what the SEG relies on.

Speed: a classic uncompressed little-endian image whose file ends with its pixel data
(most MR files) is read straight from the file's last bytes, checked against the Pixel
Data tag and length in front of them, without parsing its header a second time (the
headers were read already); any other file is decoded by pydicom. Measured on 170
slices of 256 x 256: parsing, not the disk, is what costs, and a thread pool for the
decode was slower (the GIL), so the files are read in turn.

Memory: each plane is written into the one float32 image as it is decoded (no stack of
planes beside it), and a series with more voxels to decode than the caller allows
(``max_voxels``) is refused from its headers before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.errors import SeriesError, SeriesTooLargeError
from pipeline.input.series import Series, Slice

__all__ = ["Volume", "read_volume", "decoded_voxels", "check_size", "native_plane"]

_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # UID: explicit VR
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


@dataclass(frozen=True)
class Volume:
    """A SimpleITK image (float32) and the series it was built from."""

    image: sitk.Image
    series: Series

    @property
    def array(self) -> np.ndarray:
        """Voxels as (slice, row, column), a copy."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def voxels(self) -> np.ndarray:
        """Voxels as (slice, row, column), read only and without a copy: a view of the
        image's buffer, valid while this volume is referenced."""
        return sitk.GetArrayViewFromImage(self.image)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with other voxels (e.g. after preprocessing)."""
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.image)
        return Volume(image=image, series=self.series)


def decoded_voxels(series: Series) -> tuple[int, str]:
    """How many voxels decoding ``series`` takes, and what they are: Rows x Columns of each
    classic plane, and of every frame of each multi-frame object it takes planes from
    (pydicom decodes such an object whole)."""
    classic = sum(1 for s in series.slices if s.frame_number is None)
    objects = {s.path: s.header for s in series.slices if s.frame_number is not None}
    frames = sum(int(header.get("NumberOfFrames", 1) or 1) for header in objects.values())
    parts = ([f"{classic} images"] if classic else []) + (
        [f"{frames} frames of {len(objects)} multi-frame object(s)"] if objects else [])
    return series.rows * series.columns * (classic + frames), f"{' and '.join(parts)} of {series.rows}x{series.columns}"


def check_size(series: Series, max_voxels: int | None) -> None:
    """``SeriesTooLargeError`` for a series that needs more than ``max_voxels`` voxels to
    decode (None: no limit), from its headers alone."""
    if max_voxels is not None:
        voxels, what = decoded_voxels(series)
        if voxels > max_voxels:
            raise SeriesTooLargeError(
                f"too large to decode: {voxels:,} voxels ({what}), above the limit of {max_voxels:,} per series"
                " (storage.max_series_voxels); no pixel was decoded"
            )


def native_plane(slice_: Slice, rows: int, columns: int) -> np.ndarray | None:
    """The plane of a classic uncompressed little-endian image straight from its file's
    last bytes, as pydicom would give it (it does not mask unused bits either); None when
    the file is anything else or does not end with its pixel data (pydicom decodes it)."""
    header = slice_.header
    meta = getattr(header, "file_meta", None)
    explicit = _NATIVE_LITTLE_ENDIAN.get(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
    bits = header.get("BitsAllocated")
    if (explicit is None or slice_.frame_number is not None or bits not in (8, 16)
            or int(header.get("SamplesPerPixel", 1) or 1) != 1 or int(header.get("NumberOfFrames", 1) or 1) != 1):
        return None
    size = rows * columns * bits // 8
    data = slice_.path.read_bytes()
    start = len(data) - size
    if start < 132 + 12:  # the preamble, and a file too short to end with these pixels
        return None
    length = size.to_bytes(4, "little")
    if explicit:
        element = data[start - 12:start]
        found = (element[:4] == _PIXEL_DATA_TAG and element[4:6] in (b"OW", b"OB") and element[6:8] == b"\0\0"
                 and element[8:] == length)
    else:
        element = data[start - 8:start]
        found = element[:4] == _PIXEL_DATA_TAG and element[4:] == length
    if not found:
        return None
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=rows * columns, offset=start).reshape(rows, columns)


def read_volume(series: Series, *, max_voxels: int | None = None) -> Volume:
    """Decode every slice of ``series`` into one float32 SimpleITK image; with
    ``max_voxels``, a series that needs more is refused before any pixel is decoded."""
    check_size(series, max_voxels)
    # planes go straight into the image (SimpleITK pastes in place): one float32 copy, never two
    image = sitk.Image([series.columns, series.rows, len(series.slices)], sitk.sitkFloat32)
    decoded: tuple[object, np.ndarray] | None = None  # (path, pixels) of the last file read
    for index, slice_ in enumerate(series.slices):
        try:
            pixels = native_plane(slice_, series.rows, series.columns)
            if pixels is None and (decoded is None or decoded[0] != slice_.path):
                decoded = (slice_.path, pydicom.dcmread(slice_.path).pixel_array)
            if pixels is None:
                pixels = decoded[1]
            if slice_.frame_number is not None and pixels.ndim == 3:  # a one-frame object decodes to 2D
                pixels = pixels[slice_.frame_number - 1]
        except Exception as exc:  # decoder errors come in many types
            raise SeriesError(f"cannot decode the pixels of slice {index + 1} ({slice_.path.name}): {exc}") from exc
        if pixels.shape != (series.rows, series.columns):
            raise SeriesError(
                f"slice {index + 1} has pixels of shape {pixels.shape}, header says"
                f" {series.rows}x{series.columns}"
            )
        slope, intercept = slice_.rescale
        plane = np.asarray(pixels, dtype=np.float32) * np.float32(slope) + np.float32(intercept)
        image[:, :, index] = sitk.GetImageFromArray(plane)
    image.SetOrigin(series.slices[0].position)
    row_spacing, column_spacing = series.pixel_spacing
    image.SetSpacing((column_spacing, row_spacing, series.slice_spacing))
    # Columns of the direction matrix: along a row (x), down a column (y), the normal (z).
    direction = np.column_stack([series.row_direction, series.column_direction, series.normal])
    image.SetDirection(tuple(direction.flatten()))
    return Volume(image=image, series=series)
