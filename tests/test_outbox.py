"""Result objects per destination and the outbox: each (job, destination, object) is
sent on its own, a destination that is down holds up no other, and a retry can name
the destination. The segmenter is a fake (the model is tested elsewhere); the
destinations are real dcmtk storescp processes."""

from __future__ import annotations

import pydicom
import pytest

from dicom_node.config import parse_config
from dicom_node.metrics import Metrics
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, OutboxState, StateStore
from dicom_node.work.processor import Processor
from pipeline.outputs.options import OutputRequest, SegOptions
from pipeline.process import Outcome, process_series
from pipeline.settings import PipelineSettings
from tests.support.dcmtk import StoreSCP
from tests.test_worker import FakeSegmenter, received_job

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_each_requested_object_is_made_once_and_the_report_references_the_seg(t1_dir):
    paths = sorted(t1_dir.glob("*.dcm"))
    outputs = [OutputRequest("report"), OutputRequest("overlay"), OutputRequest("seg"), OutputRequest("rtstruct"),
               OutputRequest("seg", SegOptions("LABELMAP")), OutputRequest("seg")]
    result = process_series(paths, PipelineSettings(), FakeSegmenter(90), outputs)
    assert result.outcome is Outcome.SEG, result.reason
    by_key = {obj.key: obj for obj in result.objects}
    assert list(by_key) == ["seg", "seg-labelmap", "rtstruct", "overlay", "report"]
    assert [ds.SOPClassUID for ds in by_key["seg"].datasets] == [SEG]
    assert [ds.SOPClassUID for ds in by_key["seg-labelmap"].datasets] == [LABELMAP_SEG]
    assert len(by_key["overlay"].datasets) == len(paths)  # one image per source slice
    report = by_key["report"].datasets[0]
    evidence = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in [series]}
    assert by_key["seg"].datasets[0].SOPInstanceUID in {
        ref.ReferencedSOPInstanceUID for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}, evidence
    # every object has its own series and the same UIDs when made again
    assert len({obj.series_instance_uid for obj in result.objects}) == 5
    again = process_series(paths, PipelineSettings(), FakeSegmenter(90), outputs)
    assert [[ds.SOPInstanceUID for ds in obj.datasets] for obj in again.objects] == [
        [ds.SOPInstanceUID for ds in obj.datasets] for obj in result.objects]
    assert process_series(paths, PipelineSettings(), FakeSegmenter(None), outputs).outcome is Outcome.EMPTY


@pytest.fixture
def two_destinations(tmp_path, t1_dir):
    """A worker whose job goes to two storescp destinations: ``pacs`` (SEG and overlay)
    and ``research`` (RTSTRUCT and report)."""
    pacs, research = StoreSCP(tmp_path / "pacs"), StoreSCP(tmp_path / "research")
    config = parse_config({
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "outputs": ["seg", "overlay"]},
            {"name": "research", "ae_title": "PACS", "host": "127.0.0.1", "port": research.port,
             "outputs": ["rtstruct", "report"]},
        ],
        "send": {"retry_delay_seconds": 0, "timeout_seconds": 5, "max_attempts": 2},
    }, tmp_path)
    state = StateStore(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    job_id = received_job(t1_dir, state, spool)
    worker = Processor(config, state, spool, FakeSegmenter(90), Metrics(state))
    yield worker, state, job_id, pacs, research
    pacs.stop()
    research.stop()
    state.close()


def _sop_classes(scp: StoreSCP) -> list[str]:
    return sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) for path in scp.receptions())


def _send_due(worker: Processor, state: StateStore) -> None:
    """What the send threads do now: one attempt of each due outbox row."""
    while (item := state.claim_next_send()) is not None:
        worker.send(item)


@pytest.mark.peers
def test_a_destination_that_is_down_holds_up_no_other_and_is_retried_by_name(two_destinations, t1_dir):
    worker, state, job_id, pacs, research = two_destinations
    pacs.start()  # research is down
    assert worker.process(state.claim_next_processing()) is JobState.SENDING
    _send_due(worker, state)
    slices = len(list(t1_dir.glob("*.dcm")))
    pacs.settle()
    assert _sop_classes(pacs) == sorted([SEG] + [SECONDARY_CAPTURE] * slices)  # exactly what pacs asked for, once
    rows = {(item.destination, item.object): item for item in state.outbox(job_id)}
    assert {key: item.state for key, item in rows.items()} == {
        ("pacs", "seg"): OutboxState.SENT, ("pacs", "overlay"): OutboxState.SENT,
        ("research", "rtstruct"): OutboxState.FAILED, ("research", "report"): OutboxState.FAILED}
    job = state.job(job_id)
    assert job.state is JobState.FAILED
    assert "research rtstruct: send failed after 2 attempt(s)" in job.reason and "connection refused" in job.reason
    assert state.outbox_counts()["research"].failed == 2 and state.outbox_counts()["pacs"].sent == 2
    with pytest.raises(ValueError, match="no failed send to pacs"):
        state.requeue(job_id, destination="pacs")

    research.start()
    assert state.requeue(job_id, destination="research").state is JobState.SENDING
    _send_due(worker, state)
    research.settle()
    assert _sop_classes(research) == sorted([RTSTRUCT, COMPREHENSIVE_3D_SR])
    assert len(pacs.receptions()) == slices + 1  # nothing sent to pacs again
    job = state.job(job_id)
    assert job.state is JobState.SENT and "send failed" not in job.reason
    assert {item.state for item in state.outbox(job_id)} == {OutboxState.SENT}


@pytest.mark.peers
def test_sends_to_a_destination_no_longer_configured_fail_at_start(two_destinations):
    worker, state, job_id, pacs, research = two_destinations
    pacs.start()
    worker.process(state.claim_next_processing())
    while (item := state.claim_next_send(destination="pacs")) is not None:
        worker.send(item)
    assert state.job(job_id).state is JobState.SENDING  # research's rows still pending
    assert state.fail_unconfigured(["pacs"]) == 2  # the config now names pacs only
    job = state.job(job_id)
    assert job.state is JobState.FAILED and "'research' is no longer in the configuration" in job.reason
    assert state.claim_next_send() is None
