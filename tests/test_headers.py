"""Source headers as hospitals send them: Type 2 attributes missing, patient names in
other character sets, rescaled and signed pixels, a Philips private scale.

Each variant is derived in the test from the real fl2d T1 (new UIDs, saved and read
back, so the files are encoded as a scanner would send them)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.input.classify import Classification, SequenceClass
from pipeline.input.preprocess import PreprocessingMode, preprocess
from pipeline.input.series import assemble_series, read_headers
from pipeline.input.volume import read_volume
from pipeline.model.types import LabelMap
from pipeline.outputs.common import Algorithm
from pipeline.outputs.seg import encode_seg
from pipeline.process import Outcome, algorithm_for, process_series
from pipeline.settings import PipelineSettings
from tests.test_viewers import _dciodvfy_errors
from tests.test_worker import FakeSegmenter

TYPE_2 = (
    "AccessionNumber", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime",
)
SAME_AS_SOURCE = ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber")


def derive(source_dir: Path, out_dir: Path, change: Callable[[pydicom.Dataset], None]) -> list[Path]:
    """The series with new study, series and instance UIDs, ``change`` applied to every instance."""
    out_dir.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for path in sorted(source_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        change(ds)
        target = out_dir / path.name
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths


def seg_of(paths: list[Path]) -> pydicom.Dataset:
    """The SEG of a fake segmentation, saved to bytes and read back."""
    result = process_series(paths, PipelineSettings(), FakeSegmenter(90))
    assert result.outcome is Outcome.SEG, result.reason
    buffer = io.BytesIO()
    result.seg.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _charsets(ds: pydicom.Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet", "")
    return [value] if isinstance(value, str) else list(value)


def _drop_type_2(ds: pydicom.Dataset) -> None:
    for keyword in TYPE_2:
        delattr(ds, keyword)


def test_missing_type_2_attributes_give_a_valid_seg_with_them_empty(t1_dir, tmp_path):
    paths = derive(t1_dir, tmp_path / "bare", _drop_type_2)
    assert not any(k in pydicom.dcmread(paths[0], stop_before_pixels=True) for k in TYPE_2)
    seg = seg_of(paths)
    for keyword in TYPE_2:
        assert keyword in seg and seg[keyword].is_empty, keyword
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for keyword in SAME_AS_SOURCE:
        assert str(seg.get(keyword, "")) == str(source.get(keyword, "")), keyword

    seg.save_as(tmp_path / "bare_seg.dcm", enforce_file_format=True)
    seg_of(sorted(t1_dir.glob("*.dcm"))).save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    baseline = _dciodvfy_errors(tmp_path / "seg.dcm")
    errors = _dciodvfy_errors(tmp_path / "bare_seg.dcm")
    assert set(errors) <= set(baseline), "no new errors"
    assert errors == []


def test_an_empty_optional_study_sequence_is_not_copied_into_the_seg(t1_dir, tmp_path):
    """As the Philips MPRAGE sends it: ProcedureCodeSequence present with no item."""
    def empty_procedure(ds: pydicom.Dataset) -> None:
        ds.ProcedureCodeSequence = pydicom.Sequence()

    paths = derive(t1_dir, tmp_path / "empty", empty_procedure)
    seg = seg_of(paths)
    assert "ProcedureCodeSequence" not in seg
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert _dciodvfy_errors(tmp_path / "seg.dcm") == []


def test_the_callers_headers_are_not_changed(t1_dir, tmp_path):
    series = assemble_series(read_headers(derive(t1_dir, tmp_path / "bare", _drop_type_2)))
    labels = np.zeros((len(series.slices), series.rows, series.columns), np.uint16)
    labels[5:8, 100:120, 100:120] = 90
    assert encode_seg(LabelMap(labels, {90: "brain"}, read_volume(series)), _algorithm()) is not None
    assert not any(k in s.header for s in series.slices for k in TYPE_2)


def _algorithm() -> Algorithm:
    return algorithm_for(PipelineSettings(), PreprocessingMode.INVERT, Classification(SequenceClass.T1, True, "t"))


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Gößmann^Zoë=山田^太郎"),
        ("ISO_IR 192", "Παπαδόπουλος^Γιώργος"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ],
    ids=["latin1", "utf8-cjk", "utf8-greek", "iso2022-japanese"],
)
def test_patient_names_in_other_character_sets_reach_the_seg_exactly(t1_dir, tmp_path, charset, name):
    def rename(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.AccessionNumber = "A2024-0815"

    paths = derive(t1_dir, tmp_path / "named", rename)
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    raw = source.get_item("PatientName").value  # the bytes as written
    if isinstance(charset, list):
        assert b"\x1b$B" in raw, "JIS X 0208 behind its escape sequence"
    else:
        assert raw.rstrip(b" ") == name.encode("latin-1" if charset == "ISO_IR 100" else "utf-8")
    assert str(source.PatientName) == name

    seg = seg_of(paths)
    assert _charsets(seg) == _charsets(source)
    assert str(seg.PatientName) == name
    for keyword in SAME_AS_SOURCE:
        assert str(seg.get(keyword, "")) == str(source.get(keyword, "")), keyword


# Rescale and sign: the 0..3000 clip acts on stored * RescaleSlope + RescaleIntercept
# (signed where PixelRepresentation is 1); Philips' private floating-point scale is not applied.

SLOPE, INTERCEPT = 2.5, -10.0


def _expected(stored: list[np.ndarray], slope: float, intercept: float) -> np.ndarray:
    """Equation 1 by hand: rescale, clip to 0..3000, invert within the clipped range,
    voxels at or below the clipped volume's 1st percentile to 0."""
    values = np.stack(stored).astype(np.float64) * slope + intercept
    clipped = np.clip(values, 0.0, 3000.0)
    inverted = clipped.max() - clipped + clipped.min()
    inverted[clipped <= np.percentile(clipped, 1)] = 0.0
    return inverted


def _prepared(paths: list[Path]) -> tuple[np.ndarray, list[Path]]:
    """The preprocessed volume and the files of its slices, in slice order."""
    series = assemble_series(read_headers(paths))
    array = preprocess(read_volume(series).array, PreprocessingMode.INVERT_BLACK_BACKGROUND,
                       clip_min=0, clip_max=3000, background_percentile=1)
    return array, [s.path for s in series.slices]


class Stored:
    """Writes new stored pixel values into each derived instance and remembers them by file name."""

    def __init__(self, pixels: Callable[[np.ndarray], np.ndarray], **header: object) -> None:
        self.pixels, self.header, self.by_name = pixels, header, {}

    def __call__(self, ds: pydicom.Dataset) -> None:
        stored = self.pixels(ds.pixel_array)
        ds.PixelData = stored.tobytes()
        for keyword, value in self.header.items():
            setattr(ds, keyword, value)
        self.by_name[ds.InstanceNumber] = stored

    def in_order(self, paths: list[Path]) -> list[np.ndarray]:
        return [self.by_name[pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber] for p in paths]


def test_rescale_slope_and_intercept_are_applied_before_the_clip(t1_dir, tmp_path):
    stored = Stored(lambda pixels: pixels, RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT)
    array, order = _prepared(derive(t1_dir, tmp_path / "rescaled", stored))
    expected = _expected(stored.in_order(order), SLOPE, INTERCEPT)
    assert (np.stack(stored.in_order(order)) * SLOPE + INTERCEPT).max() > 3000, "the clip matters here"
    np.testing.assert_array_equal(array, expected.astype(np.float32))


def test_signed_pixels_are_read_as_signed(t1_dir, tmp_path):
    stored = Stored(lambda pixels: pixels.astype(np.int16) - np.int16(200), PixelRepresentation=1)

    def signed(ds: pydicom.Dataset) -> None:
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):  # US here, SS when signed
            delattr(ds, keyword)
        stored(ds)

    paths = derive(t1_dir, tmp_path / "signed", signed)
    assert pydicom.dcmread(paths[0]).pixel_array.min() < 0
    array, order = _prepared(paths)
    assert min(s.min() for s in stored.by_name.values()) == -200
    np.testing.assert_array_equal(array, _expected(stored.in_order(order), 1.0, 0.0).astype(np.float32))


def test_the_philips_private_scale_slope_is_not_applied(t1_dir, tmp_path):
    plain = Stored(lambda pixels: pixels, RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT)
    plain_array, _ = _prepared(derive(t1_dir, tmp_path / "plain", plain))

    scaled = Stored(lambda pixels: pixels, RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT)

    def philips(ds: pydicom.Dataset) -> None:
        scaled(ds)
        ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x0E, "FL", 0.0123)

    paths = derive(t1_dir, tmp_path / "philips", philips)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True)[0x2005, 0x100E].value == pytest.approx(0.0123)
    array, order = _prepared(paths)
    np.testing.assert_array_equal(array, plain_array)
    np.testing.assert_array_equal(array, _expected(scaled.in_order(order), SLOPE, INTERCEPT).astype(np.float32))
