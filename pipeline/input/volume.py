"""The 3D volume of a series, with its geometry (LPS), never separated from it.

Pixels are decoded with pydicom (pylibjpeg / gdcm handle the compressed transfer
syntaxes), each file once, slice by slice (or frame by frame) in the ``Series`` order,
each plane's modality LUT (rescale slope and intercept) is applied, and the result becomes a SimpleITK image whose origin, spacing
and direction come from the validated header geometry. Slice ``k`` of the array is
``series.slices[k]``: this correspondence is what the SEG relies on.

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
from pipeline.input.series import Series

__all__ = ["Volume", "read_volume", "decoded_voxels", "check_size"]


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


def read_volume(series: Series, *, max_voxels: int | None = None) -> Volume:
    """Decode every slice of ``series`` into one float32 SimpleITK image; with
    ``max_voxels``, a series that needs more is refused before any pixel is decoded."""
    check_size(series, max_voxels)
    # planes go straight into the image (SimpleITK pastes in place): one float32 copy, never two
    image = sitk.Image([series.columns, series.rows, len(series.slices)], sitk.sitkFloat32)
    decoded: tuple[object, np.ndarray] | None = None  # (path, pixels) of the last file read
    for index, slice_ in enumerate(series.slices):
        try:
            if decoded is None or decoded[0] != slice_.path:
                decoded = (slice_.path, pydicom.dcmread(slice_.path).pixel_array)
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
