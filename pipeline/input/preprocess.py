"""The preprint's intensity preprocessing (Häntze et al., Equation 1).

Three variants, by name:

* ``none`` - the volume as acquired.
* ``invert`` - clip to ``[clip_min, clip_max]``, then ``INV(x) = max(X) - x + min(X)``
  where ``max``/``min`` are taken over the *clipped* volume, so the output stays in
  the clipped range.
* ``invert_black_background`` - as ``invert``, and every voxel whose *clipped* value
  lies within the first ``background_percentile`` percent of the clipped volume is set
  to 0, so the air around the patient stays black as in a CT.

Decisions where the equation leaves a choice open:

* The percentile is taken over the whole volume (all voxels, background included),
  with numpy's default linear interpolation.
* Ties: a voxel whose clipped value is ``<=`` the percentile value counts as
  background (so a volume with many voxels at the minimum has all of them blackened).
* Output dtype is float32; the inverted values are exact for integer input.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

__all__ = ["PreprocessingMode", "preprocess", "invert_t1"]


class PreprocessingMode(str, Enum):
    NONE = "none"
    INVERT = "invert"
    INVERT_BLACK_BACKGROUND = "invert_black_background"


def invert_t1(
    voxels: np.ndarray,
    *,
    clip_min: float = 0.0,
    clip_max: float = 3000.0,
    background_percentile: float | None = 1.0,
) -> np.ndarray:
    """Equation 1: clip, invert within the clipped range, optionally blacken background."""
    if clip_min >= clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be below clip_max ({clip_max})")
    clipped = np.clip(voxels.astype(np.float32, copy=False), clip_min, clip_max)
    low, high = float(clipped.min()), float(clipped.max())
    background = None
    if background_percentile is not None:
        if not 0.0 <= background_percentile <= 100.0:
            raise ValueError(f"background_percentile must be within 0..100, got {background_percentile}")
        background = clipped <= np.percentile(clipped, background_percentile)
    # in place: the clipped copy becomes the result, with the float32 steps of high - x + low
    inverted = np.subtract(high, clipped, out=clipped)
    inverted += low
    if background is not None:
        inverted[background] = 0.0
    return inverted


def preprocess(
    voxels: np.ndarray,
    mode: PreprocessingMode | str,
    *,
    clip_min: float = 0.0,
    clip_max: float = 3000.0,
    background_percentile: float = 1.0,
) -> np.ndarray:
    """Apply one of the preprint's three variants to a voxel array."""
    mode = PreprocessingMode(mode)
    if mode is PreprocessingMode.NONE:
        return voxels.astype(np.float32, copy=False)
    return invert_t1(
        voxels,
        clip_min=clip_min,
        clip_max=clip_max,
        background_percentile=background_percentile
        if mode is PreprocessingMode.INVERT_BLACK_BACKGROUND
        else None,
    )
