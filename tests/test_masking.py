"""One masking rule (``pipeline.masking``): the patient's name parts, IDs and birth date are
hidden in every text the node records about a series, and long text is cut.

The in-process node's model stand-in fails with a message that quotes the header, as a
library's error sometimes does; the job record and the log must not carry it."""

from __future__ import annotations

import logging

import pydicom
import pytest

from dicom_node.store.state import JobState
from pipeline.errors import SegmentationError
from pipeline.masking import MASK, PatientMask, cut
from pipeline.routing.facts import series_facts
from pipeline.input.classify import Classification, SequenceClass
from tests.derived import copy_series
from tests.support.dcmtk import storescu
from tests.support.inprocess import inprocess_node
from tests.support.wait import wait_until

FAMILY, GIVEN, MRN, BIRTH = "Mustermann", "Erika", "MRN778899", "19641231"
SECRETS = (FAMILY, GIVEN, MRN, BIRTH)


def _header(**extra) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName = f"{FAMILY}^{GIVEN}"
    ds.PatientID = MRN
    ds.PatientBirthDate = BIRTH
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def test_every_name_part_the_id_and_the_birth_date_are_masked_in_any_case():
    mask = PatientMask.of(_header(OtherPatientIDs=["ALT-55501", "X1"]))
    text = f"t1 {FAMILY.upper()} {GIVEN.lower()} {MRN} born {BIRTH}, alt ALT-55501, {FAMILY}^{GIVEN}, sag x1"
    masked = mask(text)
    assert masked == f"t1 {MASK} {MASK} {MASK} born {MASK}, alt {MASK}, {MASK}, sag x1"
    assert mask(None) is None and PatientMask()("t1 mprage") == "t1 mprage"
    # a short name part ("Li") and a short word inside one ("van der") are left: they would mask ordinary words
    short = PatientMask.of(_header(PatientName="van der Berg^Li"))
    assert short("Li's header, van der Berg") == f"Li's header, {MASK}"


def test_long_text_is_one_line_cut_with_an_ellipsis():
    assert cut("t1 mprage") == "t1 mprage"
    long = cut("t1\n" + "x" * 5000)
    assert len(long) == 200 and long.endswith("…") and "\n" not in long
    assert cut(None) is None


def test_the_routing_facts_use_the_same_mask():
    header = _header(SeriesDescription=f"t1 {FAMILY} {GIVEN} {MRN}", StudyDescription=f"head {BIRTH}",
                     ProtocolName=f"{GIVEN.upper()}_t1", Modality="MR")
    facts = series_facts([header], Classification(SequenceClass.T1, True, "test"), "MODALITY")
    for text in (facts.series_description, facts.study_description, facts.protocol_name):
        assert MASK in text and not any(secret.lower() in text.lower() for secret in SECRETS)


class QuotingSegmenter:
    """A model that fails with a message quoting the patient, as a library might."""

    def describe(self) -> str:
        return "quoting"

    def segment(self, volume):
        raise SegmentationError(f"cannot segment the series of {FAMILY}^{GIVEN} ({MRN}, born {BIRTH})")


@pytest.mark.peers
def test_a_failed_jobs_reason_and_log_carry_no_patient_data(tmp_path, storescp, t1_dir, caplog):
    series = tmp_path / "series"
    for path in copy_series(t1_dir, series, "masking"):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{FAMILY}^{GIVEN}", MRN, BIRTH
        ds.SeriesDescription = f"t1 {FAMILY} {GIVEN} {MRN}"
        ds.save_as(path)
    node = inprocess_node(tmp_path / "node", storescp, segmenter=QuotingSegmenter(), completion={"stable_seconds": 1})
    caplog.set_level(logging.INFO)
    node.start()
    try:
        storescu(node.config.node.port, series)
        [job] = wait_until(lambda: [j for j in node.state.jobs() if j.state is JobState.FAILED], 120, 0.2,
                           "the job to fail")
    finally:
        node.stop()
    assert "cannot segment the series of" in job.reason and MASK in job.reason  # the reason is kept, masked
    recorded = " ".join(str(value) for value in vars(job).values())
    logged = caplog.text
    for secret in SECRETS:
        assert secret.lower() not in recorded.lower(), f"{secret} in the job record"
        assert secret.lower() not in logged.lower(), f"{secret} in the log"
