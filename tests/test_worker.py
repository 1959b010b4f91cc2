"""The worker's job state machine, with a fake segmenter (the model is tested elsewhere)
and a real dcmtk storescp as destination."""

import dataclasses
import shutil

import numpy as np
import pytest

from dicom_node.config import parse_config
from dicom_node.metrics import Metrics
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, SeriesRef, StateStore
from dicom_node.work.processor import Processor, retry_delay
from pipeline.model.types import LabelMap
from tests.support.asserts import assert_exactly_one_seg
from tests.support.dcmtk import StoreSCP
from tests.support.paths import free_port


class FakeSegmenter:
    def __init__(self, label: int | None, shift_mm: float = 0.0) -> None:
        self.label = label
        self.shift_mm = shift_mm  # a label map on a grid moved off the source slices

    def describe(self) -> str:
        return "fake"

    def segment(self, volume):
        array = np.zeros(volume.array.shape, np.uint16)
        if self.label:
            array[5:10, 100:120, 100:120] = self.label
        if self.shift_mm:
            series = volume.series
            moved = tuple(
                dataclasses.replace(s, position=tuple(v + self.shift_mm for v in s.position)) for s in series.slices
            )
            volume = dataclasses.replace(volume, series=dataclasses.replace(series, slices=moved))
        return LabelMap(array, {90: "brain"}, volume)


@pytest.fixture
def setup(tmp_path, t1_dir):
    def make(label, port, shift_mm=0.0, **send):
        config = parse_config(
            {
                "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": port},
                "send": {"retry_delay_seconds": 0, "timeout_seconds": 5, **send},
            },
            tmp_path,
        )
        state = StateStore(tmp_path / "state.db")
        spool = Spool(tmp_path / "spool")
        job_id = received_job(t1_dir, state, spool)
        return Processor(config, state, spool, FakeSegmenter(label, shift_mm), Metrics(state)), state, job_id

    return make


def received_job(folder, state: StateStore, spool: Spool) -> int:
    """The series in ``folder`` stored and recorded as the SCP does, completed: its job's id."""
    import pydicom

    series = None
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        target = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
        series = SeriesRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, "MOD", target.parent)
        state.record_instance(series, ds.SOPInstanceUID, ds.SOPClassUID, target)
    return state.complete_series(series.series_instance_uid)


def _next(state):
    """What the node's threads would take next: a job to process, else the job of a due send."""
    job = state.claim_next_processing()
    if job is None:
        item = state.claim_next_send()
        job = None if item is None else state.job(item.job_id)
    return job


def test_empty_prediction_ends_without_a_seg(setup):
    worker, state, job_id = setup(None, free_port())
    assert worker.run(_next(state)) is JobState.NO_RESULT
    job = state.job(job_id)
    assert job.result_path is None and "found no structure" in job.reason


@pytest.mark.peers
def test_failed_send_stays_queued_then_arrives(setup, tmp_path):
    pacs = StoreSCP(tmp_path / "pacs")
    worker, state, job_id = setup(90, pacs.port, max_attempts=5)
    assert worker.run(_next(state)) is JobState.SENDING
    job = state.job(job_id)
    assert job.attempts == 1 and "send attempt 1 failed" in job.last_error and job.result_path.exists()
    assert "segment(s)" in job.reason  # the outcome's reason is kept apart from the failure
    pacs.start()
    try:
        assert worker.run(_next(state)) is JobState.SENT
    finally:
        pacs.stop()
    assert_exactly_one_seg(pacs, state.job(job_id).series.series_instance_uid)
    assert len(pacs.receptions()) == 1


@pytest.mark.peers
def test_send_gives_up_after_max_attempts_keeps_the_seg_and_can_be_retried(setup, tmp_path):
    pacs = StoreSCP(tmp_path / "pacs")
    worker, state, job_id = setup(90, pacs.port, max_attempts=2)
    worker.run(_next(state))
    assert worker.run(_next(state)) is JobState.FAILED
    job = state.job(job_id)
    assert "; send failed: pacs seg: send failed after 2 attempt(s)" in job.reason and job.result_path.exists()
    assert state.requeue(job_id).state is JobState.SENDING
    pacs.start()
    try:
        assert worker.run(_next(state)) is JobState.SENT
    finally:
        pacs.stop()
    assert_exactly_one_seg(pacs, state.job(job_id).series.series_instance_uid)
    assert len(pacs.receptions()) == 1


def test_pipeline_error_fails_the_job_and_keeps_the_series(setup, tmp_path):
    worker, state, job_id = setup(90, free_port())
    job = _next(state)
    victim = state.instance_paths(job.series.series_instance_uid)[17]
    shutil.move(victim, tmp_path / "aside.dcm")  # a recorded instance lost on disk
    assert worker.run(job) is JobState.FAILED
    assert f"cannot read {victim.name}" in state.job(job_id).reason
    assert len(list(job.series.folder.glob("*.dcm"))) == 34


@pytest.mark.peers
def test_seg_off_its_source_grid_fails_the_job_and_nothing_is_sent(setup, tmp_path):
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        worker, state, job_id = setup(90, pacs.port, shift_mm=0.05)
        assert worker.run(_next(state)) is JobState.FAILED
    finally:
        pacs.stop()
    job = state.job(job_id)
    assert "SEG frame 1 lies at" in job.reason and job.result_path is None
    assert pacs.receptions() == []
    assert len(list(job.series.folder.glob("*.dcm"))) == 35, "the series stays on disk"


def test_retry_delay_grows_and_is_capped():
    assert [retry_delay(n, 10) for n in (1, 2, 3)] == [10, 20, 40]
    assert retry_delay(30, 10) == 3600
