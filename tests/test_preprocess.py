import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.input.preprocess import PreprocessingMode, invert_t1, preprocess

# A hand-computed case: 10 voxels, one above the clip range, one below.
X = np.array([-5, 0, 10, 100, 200, 500, 1000, 2000, 2999, 4000], dtype=np.int16)
CLIPPED = np.array([0, 0, 10, 100, 200, 500, 1000, 2000, 2999, 3000], dtype=np.float32)
# min 0, max 3000 of the clipped volume: INV(x) = 3000 - x + 0
INVERTED = np.array([3000, 3000, 2990, 2900, 2800, 2500, 2000, 1000, 1, 0], dtype=np.float32)


def test_none_keeps_values():
    assert np.array_equal(preprocess(X, "none"), X.astype(np.float32))


def test_invert_is_equation_1_without_background():
    assert np.array_equal(preprocess(X, "invert"), INVERTED)


def test_invert_black_background_blackens_the_first_percentile_including_ties():
    # 1st percentile of CLIPPED (linear interpolation) is 0: both voxels at 0 are background.
    expected = INVERTED.copy()
    expected[:2] = 0
    assert np.array_equal(preprocess(X, PreprocessingMode.INVERT_BLACK_BACKGROUND), expected)


def test_percentile_is_taken_over_the_whole_volume():
    volume = np.arange(100, dtype=np.float32).reshape(4, 5, 5)  # values 0..99
    out = invert_t1(volume, background_percentile=10).ravel()  # 10th percentile = 9.9
    assert np.all(out[:10] == 0)  # the ten darkest voxels are background
    assert np.array_equal(out[10:], 99 - np.arange(10, 100, dtype=np.float32))
    assert out.dtype == np.float32


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        invert_t1(X, clip_min=10, clip_max=5)
    with pytest.raises(ValueError):
        preprocess(X, "upside_down")


# Stored MR pixel values are integers; float32 output is exact for them (see the docstring).
volumes = arrays(np.int32, st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 6)),
                 elements=st.integers(-500, 5000))


@settings(max_examples=200, deadline=None)
@given(volumes)
def test_invariants(volume):
    clipped = np.clip(volume, 0, 3000)
    for mode in ("invert", "invert_black_background"):
        out = preprocess(volume, mode)
        assert out.min() >= 0 and out.max() <= 3000
    out = preprocess(volume, "invert_black_background")
    background = clipped <= np.percentile(clipped, 1)
    assert np.all(out[background] == 0)
    kept = ~background
    order = np.argsort(clipped[kept], kind="stable")
    values, mapped = clipped[kept][order], out[kept][order]
    distinct = np.diff(values) > 0
    assert np.all(np.diff(mapped)[distinct] < 0), "strictly decreasing on the voxels it keeps"
