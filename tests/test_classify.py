"""The T1/T2 gate, against every series of the shared data and its MANIFEST."""

import re

import pydicom
import pytest

from pipeline.input.classify import ClassRule, SequenceClass, classify_series
from pipeline.process import read_image_headers

# folder -> (class, anatomical, a word the MANIFEST row must contain to back this up)
EXPECTED = {
    "t1_siemens_3t_fl2d_sag_hfs": (SequenceClass.T1, True, "Classify T1"),
    "t1_philips_3t_mprage_sag": (SequenceClass.T1, True, "Classify T1"),
    "t2_siemens_3t_tse_ax_adi": (SequenceClass.T2, True, "Classify T2"),
    "hard_missing_slice_t1_fl2d_sag_hfs_derived": (SequenceClass.T1, True, "Detect the gap"),  # the fl2d T1
    "hard_j2k_lossless_t1_fl2d_sag_hfdl_derived": (SequenceClass.T1, True, "classify T1"),
    "hard_localizer_ge_3plane_phantom": (SequenceClass.OTHER, False, "not a single-orientation volume"),
    "hard_enhanced_philips_pcasl_source_plus_raw": (SequenceClass.OTHER, False, "not T1"),
    "hard_ts_variants_siemens_epi_mosaic_1slice": (SequenceClass.OTHER, False, "Not a volume"),
    "hard_enhanced_philips_b0map_t1label_phantom": (SequenceClass.OTHER, False, "not an anatomical T1"),
}


def _manifest_rows(mri_dir):
    rows = {}
    for line in (mri_dir / "MANIFEST.md").read_text().splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(3)
    return rows


def test_expectations_cover_the_manifest(mri_dir):
    rows = _manifest_rows(mri_dir)
    assert set(rows) == set(EXPECTED)
    for folder, (_, _, phrase) in EXPECTED.items():
        assert phrase.lower() in rows[folder].lower(), f"MANIFEST row of {folder} no longer says {phrase!r}"


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_classifier_matches_the_manifest(mri_dir, folder):
    headers = read_image_headers(sorted((mri_dir / folder).glob("*.dcm")))
    result = classify_series(headers)
    expected_class, anatomical, _ = EXPECTED[folder]
    assert (result.sequence_class, result.anatomical) == (expected_class, anatomical), result.reason
    assert result.reason


def _header(**values) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 15}, SequenceClass.T1),
        ({"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": 100}, SequenceClass.T2),
        ({"ScanningSequence": "SE", "RepetitionTime": 3000, "EchoTime": 20}, SequenceClass.PD),
        ({"ScanningSequence": ["SE", "IR"], "RepetitionTime": 9000, "EchoTime": 90, "InversionTime": 2500}, SequenceClass.T2),
        ({"ScanningSequence": ["GR", "IR"], "SequenceVariant": "MP", "RepetitionTime": 2300, "EchoTime": 3,
          "InversionTime": 900}, SequenceClass.T1),
        ({"ScanningSequence": "GR", "RepetitionTime": 600, "EchoTime": 20}, SequenceClass.OTHER),
        ({"SeriesDescription": "t1_vibe_fs"}, SequenceClass.T1),  # no timing: the description hints
    ],
)
def test_heuristics(values, expected):
    assert classify_series([_header(**values)]).sequence_class is expected


def test_a_site_rule_overrides_the_heuristics():
    header = _header(ScanningSequence="SE", RepetitionTime=4000, EchoTime=100, SeriesDescription="AX T2 odd")
    result = classify_series([header], [ClassRule("odd", SequenceClass.PD)])
    assert result.sequence_class is SequenceClass.PD and "site rule" in result.reason
