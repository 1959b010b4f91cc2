"""The database file of the previous release opens in this one, on a copy.

``tests/data/state-of-the-previous-release.sqlite3`` was written by the release before
the store was split into ``dicom_node/store/`` (the ``StateStore`` of commit 65553ef):
a job sent to two destinations (one send retried, one with a warning), a skipped job and
a job still waiting. The rows are read by column name now; this proves the names match.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dicom_node.store.state import JobState, JobUpdate, OutboxState, StateStore

OLD = Path(__file__).resolve().parent / "data" / "state-of-the-previous-release.sqlite3"


def test_the_previous_release_database_opens_with_every_row(tmp_path):
    original = OLD.read_bytes()
    copy = tmp_path / "state.sqlite3"
    shutil.copyfile(OLD, copy)
    state = StateStore(copy)
    jobs = {job.id: job for job in state.jobs()}
    assert [(job.id, job.state) for job in jobs.values()] == [
        (1, JobState.SENT), (2, JobState.SKIPPED), (3, JobState.RECEIVED)]
    sent = jobs[1]
    assert (sent.sequence_class, sent.preprocessing, sent.routing) == ("T1", "invert_black_background",
                                                                       "rule t1: matches")
    assert sent.seg_series_uid == "1.2.826.0.1.3680043.10.9.1"
    assert sent.series.calling_ae_title == "MODALITY" and sent.series.folder == Path("/spool/incoming/1/1")
    assert (sent.received_at, sent.completed_at, sent.processing_at, sent.processed_at, sent.sent_at) == (
        100, 110, 111, 120, 127)
    assert sent.attempts == 3 and "connection refused" in sent.last_error
    assert "sent with warning 0xB000 from archive (rtstruct)" in sent.reason
    outbox = {item.destination: item for item in state.outbox(1)}
    assert {name: item.state for name, item in outbox.items()} == {"pacs": OutboxState.SENT,
                                                                    "archive": OutboxState.SENT}
    assert state.instance_paths(sent.series.series_instance_uid, upto_seq=sent.upto_seq) == [
        Path(f"/spool/incoming/1/1/{n}.dcm") for n in (1, 2, 3)]
    assert jobs[2].reason == "skipped: T2 series"
    assert [ok for _, ok, _ in state.recent_sends(10, "pacs")] == [True, False]
    # and the store goes on from there: the waiting job runs, an ended one is processed again
    claimed = state.claim_next_processing(now=200)
    assert claimed is not None and claimed.id == 3
    assert state.update_job(3, JobState.NO_RESULT, JobUpdate(reason="no structure found"),
                            expect=JobState.PROCESSING, now=201)
    again = state.reprocess(2, now=202)
    assert (again.id, again.reprocess_of, again.state) == (4, 2, JobState.RECEIVED)
    state.close()
    assert OLD.read_bytes() == original  # the migration ran on the copy
