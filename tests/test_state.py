from pathlib import Path

import pytest

from dicom_node.state import JobState, SeriesRef, StateStore


def _series(uid: str) -> SeriesRef:
    return SeriesRef("1.2.3", uid, "MODALITY", Path("/spool") / uid)


def test_series_becomes_one_job_and_jobs_run_in_arrival_order(tmp_path):
    state = StateStore(tmp_path / "s.db")
    for uid in ("1.2.3.1", "1.2.3.2"):
        state.record_instance(_series(uid), uid + ".1", "1.2.840.10008.5.1.4.1.1.4", Path(f"/x/{uid}.1"), now=1)
    assert state.complete_series("1.2.3.2", now=2) == 1
    assert state.complete_series("1.2.3.1", now=3) == 2
    assert state.complete_series("1.2.3.1", now=4) is None  # already complete
    first = state.claim_next_job(now=5)
    assert (first.id, first.state) == (1, JobState.PROCESSING)
    assert state.claim_next_job(now=5).id == 2
    assert state.claim_next_job(now=5) is None


def test_state_survives_reopening_and_interrupted_jobs_resume(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    job_id = state.complete_series("1.2.3.1", now=2)
    state.claim_next_job(now=3)
    state.close()
    reopened = StateStore(tmp_path / "s.db")
    assert reopened.job(job_id).state is JobState.PROCESSING
    assert reopened.resume_interrupted() == 1
    assert reopened.job(job_id).state is JobState.RECEIVED
    assert reopened.instance_paths("1.2.3.1") == [Path("/x/a")]


def test_only_failed_jobs_can_be_retried(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    job_id = state.complete_series("1.2.3.1", now=2)
    with pytest.raises(ValueError):
        state.requeue(job_id)
    state.update_job(job_id, JobState.FAILED, reason="weights missing")
    assert state.requeue(job_id).state is JobState.RECEIVED


def test_new_instance_reopens_a_completed_series(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    state.complete_series("1.2.3.1", now=2)
    assert state.receiving_series() == []
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.2", "1.2", Path("/x/b"), now=3)
    assert state.receiving_series() == [("1.2.3.1", 3)]
