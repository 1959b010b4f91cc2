from pathlib import Path

import pytest

from dicom_node.store.state import JobState, JobUpdate, SeriesRef, StateStore


def _series(uid: str) -> SeriesRef:
    return SeriesRef("1.2.3", uid, "MODALITY", Path("/spool") / uid)


def test_series_becomes_one_job_and_jobs_run_in_arrival_order(tmp_path):
    state = StateStore(tmp_path / "s.db")
    for uid in ("1.2.3.1", "1.2.3.2"):
        state.record_instance(_series(uid), uid + ".1", "1.2.840.10008.5.1.4.1.1.4", Path(f"/x/{uid}.1"), now=1)
    assert state.complete_series("1.2.3.2", now=2) == 1
    assert state.complete_series("1.2.3.1", now=3) == 2
    assert state.complete_series("1.2.3.1", now=4) is None  # already complete
    first = state.claim_next_processing(now=5)
    assert (first.id, first.state) == (1, JobState.PROCESSING)
    assert state.claim_next_processing(now=5).id == 2
    assert state.claim_next_processing(now=5) is None


def test_state_survives_reopening_and_interrupted_jobs_resume(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    job_id = state.complete_series("1.2.3.1", now=2)
    state.claim_next_processing(now=3)
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
    state.update_job(job_id, JobState.FAILED, JobUpdate(reason="weights missing"))
    assert state.requeue(job_id).state is JobState.RECEIVED


def test_new_instance_reopens_a_completed_series(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    state.complete_series("1.2.3.1", now=2)
    assert state.receiving_series() == []
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.2", "1.2", Path("/x/b"), now=3)
    assert state.receiving_series() == [("1.2.3.1", 3)]


def test_a_grown_series_gets_a_new_job_that_supersedes_the_unsent_one(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    first = state.complete_series("1.2.3.1", now=2)
    state.claim_next_processing(now=3)  # the worker is processing it
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.2", "1.2", Path("/x/b"), now=4)  # a late instance
    second = state.complete_series("1.2.3.1", now=5)
    assert second == first + 1
    old = state.job(first)
    assert old.state is JobState.SUPERSEDED and f"superseded by job {second}" in old.reason
    # the worker's result for the old job is refused: it is not `processing` any more
    assert not state.update_job(first, JobState.SENDING, expect=JobState.PROCESSING)
    assert state.instance_paths("1.2.3.1", upto_seq=old.upto_seq) == [Path("/x/a")]
    assert state.instance_paths("1.2.3.1", upto_seq=state.job(second).upto_seq) == [Path("/x/a"), Path("/x/b")]


def test_a_sent_job_is_not_superseded_but_named_for_the_new_seg(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    first = state.complete_series("1.2.3.1", now=2)
    state.update_job(first, JobState.SENT, JobUpdate(seg_series_uid="9.9.1"))
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.2", "1.2", Path("/x/b"), now=3)
    second = state.complete_series("1.2.3.1", now=4)
    assert state.job(first).state is JobState.SENT
    assert state.sent_seg_series("1.2.3.1", before_job=second) == "9.9.1"
    assert state.sent_seg_series("1.2.3.1", before_job=first) is None


def test_the_same_instances_again_make_no_new_job_unless_the_last_failed(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=1)
    first = state.complete_series("1.2.3.1", now=2)
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=3)  # the sender repeats
    assert state.complete_series("1.2.3.1", now=4) is None
    assert [j.id for j in state.jobs()] == [first]
    state.update_job(first, JobState.FAILED, JobUpdate(reason="weights missing"))
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.1", "1.2", Path("/x/a"), now=5)
    assert state.complete_series("1.2.3.1", now=6) == first + 1
    with pytest.raises(ValueError, match="replaces it"):
        state.requeue(first)  # a retry of the older job would send an outdated result


def test_a_database_of_the_previous_release_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE series (series_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
            calling_ae_title TEXT NOT NULL, folder TEXT NOT NULL, first_received_at REAL NOT NULL,
            last_received_at REAL NOT NULL, receiving INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, received_at REAL NOT NULL);
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_instance_uid TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, sequence_class TEXT,
            preprocessing TEXT, result_path TEXT, next_attempt_at REAL NOT NULL DEFAULT 0,
            purged INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL);
        INSERT INTO series VALUES ('1.2.3.1', '1.2.3', 'MOD', '/spool', 1, 1, 0);
        INSERT INTO instances VALUES ('1.2.3.1.1', '1.2.3.1', '1.2', '/x/a', 1);
        INSERT INTO instances VALUES ('1.2.3.1.2', '1.2.3.1', '1.2', '/x/b', 2);
        INSERT INTO jobs (series_instance_uid, state, reason, created_at, updated_at)
            VALUES ('1.2.3.1', 'sent', '2 segment(s)', 3, 3);
    """)
    old.commit()
    old.close()
    state = StateStore(path)
    job = state.jobs()[0]
    assert (job.state, job.reason, job.last_error) == (JobState.SENT, "2 segment(s)", None)
    assert state.instance_paths("1.2.3.1", upto_seq=job.upto_seq) == [Path("/x/a"), Path("/x/b")]
    # the old job covers the whole series: the same instances again make no new job
    state.record_instance(_series("1.2.3.1"), "1.2.3.1.2", "1.2", Path("/x/b"), now=4)
    assert state.complete_series("1.2.3.1", now=5) is None
