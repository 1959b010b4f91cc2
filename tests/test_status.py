"""``dicom-node status``: when each job was received, completed, processed and sent, and
how long each stage took; the last error kept apart from the outcome; a database of the
previous release migrated on open. The round trip runs through a real Orthanc that is
down for the first send, so the node's readiness names the destination meanwhile."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime

import pytest
import requests
import yaml

from dicom_node.store.state import JobState, JobUpdate, StateStore
from tests.support.asserts import series_uid_of
from tests.support.node import NodeProcess, node_config, status_of
from tests.support.orthanc import Orthanc
from tests.support.paths import free_port
from tests.support.wait import wait_until

# The schema of the release before the timestamps (commit 04995b0), as its databases are on disk.
_PREVIOUS_SCHEMA = """
CREATE TABLE series (
    series_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL, calling_ae_title TEXT NOT NULL,
    folder TEXT NOT NULL, first_received_at REAL NOT NULL, last_received_at REAL NOT NULL,
    receiving INTEGER NOT NULL DEFAULT 1);
CREATE TABLE instances (
    sop_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
    sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, received_at REAL NOT NULL, seq INTEGER NOT NULL DEFAULT 0,
    placement TEXT);
CREATE INDEX instances_by_series ON instances(series_instance_uid);
CREATE INDEX instances_by_seq ON instances(seq);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, sequence_class TEXT, preprocessing TEXT,
    result_path TEXT, next_attempt_at REAL NOT NULL DEFAULT 0, purged INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, upto_seq INTEGER NOT NULL DEFAULT 0, seg_series_uid TEXT,
    last_error TEXT);
CREATE INDEX jobs_by_state ON jobs(state, id);
"""


def test_a_database_of_the_previous_release_gets_the_timestamps_on_open(tmp_path):
    db = tmp_path / "state.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(_PREVIOUS_SCHEMA)
    old.execute("INSERT INTO series VALUES ('1.2.3.4', '1.2.3', 'MODALITY', '/spool/x', 100, 101, 0)")
    old.execute("INSERT INTO instances VALUES ('1.2.3.4.1', '1.2.3.4', '1.2.840.10008.5.1.4.1.1.4', '/x', 100, 1, NULL)")
    old.execute("INSERT INTO jobs (series_instance_uid, state, attempts, reason, created_at, updated_at, upto_seq,"
                " last_error) VALUES ('1.2.3.4', 'sent', 2, '3 segment(s)', 105, 140, 1, 'send attempt 1 failed')")
    old.commit()
    old.close()

    state = StateStore(db)
    job = state.job(1)
    assert (job.state, job.reason, job.last_error) == (JobState.SENT, "3 segment(s)", "send attempt 1 failed")
    assert (job.received_at, job.processing_at, job.sent_at) == (None, None, None)  # not known for old jobs
    assert set(job.stage_seconds().values()) == {None}
    # the stamps work on the old rows from now on
    again = state.reprocess(1, now=200)
    # the old job knows no stamps to copy: the series' first instance, and the new job's creation
    assert (again.received_at, again.completed_at, again.reprocess_of) == (100, 200, 1)
    state.claim_next_processing(now=201)
    state.update_job(again.id, JobState.SKIPPED, JobUpdate(reason="skipped: policy"), now=203)
    assert state.job(again.id).stage_seconds() == {"receiving": 100.0, "queued": 1.0, "processing": 2.0,
                                                   "sending": None}
    state.close()

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                                      "storage": {"state_db": str(db), "spool_dir": str(tmp_path / "spool")}}))
    old_job, new_job = (json.loads(line) for line in status_of(config, "--json").stdout.splitlines())
    assert (old_job["sent_at"], old_job["durations"]["sending"]) == (None, None)
    assert old_job["last_error"] == "send attempt 1 failed" and old_job["state"] == "sent"
    assert new_job["reprocess_of"] == 1 and new_job["durations"]["processing"] == 2.0
    text = status_of(config).stdout
    assert "received -" in text and "processed 1970-01-01 00:03:23 (2.0s)" in text


def test_every_send_attempt_is_logged_per_destination(tmp_path):
    state = StateStore(tmp_path / "s.db")
    from dicom_node.store.state import SeriesRef

    state.record_instance(SeriesRef("1.2.3", "1.2.3.1", "MODALITY", tmp_path), "1.2.3.1.1", "1.2", tmp_path / "a",
                          now=10)
    job = state.complete_series("1.2.3.1", now=12)
    state.claim_next_processing(now=13)
    assert state.start_sending(job, [("pacs", "seg", tmp_path / "seg"), ("archive", "seg", tmp_path / "seg")],
                               JobUpdate(result_path=tmp_path / "seg" / "1.dcm", reason="made"), now=20)
    pacs, archive = sorted((item for item in state.outbox(job)), key=lambda item: item.destination != "pacs")
    assert state.record_send(pacs.id, ok=False, error="send attempt 1 failed: connection refused", retry_at=22,
                             now=21) is JobState.SENDING
    assert state.record_send(archive.id, ok=True, now=21.5) is JobState.SENDING  # pacs still pending
    assert state.job(job).attempts == 2 and state.job(job).next_attempt_at == 22
    assert state.record_send(pacs.id, ok=True, now=23) is JobState.SENT
    assert state.recent_sends(5, "pacs") == [(23.0, True, None),
                                             (21.0, False, "send attempt 1 failed: connection refused")]
    assert state.recent_sends(5, "archive") == [(21.5, True, None)]
    assert state.outbox_counts()["pacs"].sent == 1 and state.job(job).attempts == 3
    stamped = state.job(job)
    assert (stamped.received_at, stamped.completed_at, stamped.processing_at, stamped.processed_at,
            stamped.sent_at) == (10, 12, 13, 20, 23)
    assert stamped.stage_seconds() == {"receiving": 2.0, "queued": 1.0, "processing": 7.0, "sending": 3.0}
    state.close()


# -- an Orthanc round trip whose first send fails ------------------------------------------------

@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, phantom_weights, t1_dir):
    """Orthanc sends the T1 series to the node and goes down before the SEG comes back; the
    first send fails (connection refused), readiness says so, Orthanc comes back, the
    next attempt delivers. Yields the node, Orthanc and what /readyz said meanwhile."""
    folder = tmp_path_factory.mktemp("status")
    node_port = free_port()
    orthanc = Orthanc(folder / "orthanc", node_port=node_port).start()
    config = node_config(folder / "node", destination=(orthanc.ae_title, orthanc.dicom_port),
                         weights_dir=phantom_weights, http={"port": free_port(), "unready_after_failed_sends": 1},
                         send={"max_attempts": 10, "retry_delay_seconds": 2, "timeout_seconds": 10})
    config["node"]["port"] = node_port
    node = NodeProcess(folder / "node", config).start()
    ready = f"http://127.0.0.1:{config['http']['port']}/readyz"
    seen = {}
    try:
        # ready once Orthanc has answered the node's echo at start (in the background, never holding up the start)
        wait_until(lambda: requests.get(ready, timeout=10).status_code == 200, 30, 0.2, "ready before the round trip")
        seen["before"] = requests.get(ready, timeout=10)
        series = orthanc.upload(t1_dir)
        seen["series"] = series
        orthanc.post("/modalities/node/store", {"Resources": series, "Synchronous": True})
        orthanc.stop()
        failed = wait_until(lambda: [job for job in node.jobs() if job.last_error], 300, 0.5, "a failed send")
        assert failed[0].state is JobState.SENDING
        seen["down"] = requests.get(ready, timeout=10)
        orthanc.start()
        wait_until(lambda: [job.state for job in node.jobs()] == [JobState.SENT], 120, 0.5, "the SEG sent")
        seen["after"] = requests.get(ready, timeout=10)
        yield node, orthanc, seen
    finally:
        node.stop(signal.SIGKILL)
        orthanc.stop()


@pytest.mark.e2e
@pytest.mark.peers
def test_readiness_names_the_destination_while_its_sends_fail(round_trip):
    node, orthanc, seen = round_trip
    assert seen["before"].status_code == 200, seen["before"].text
    assert seen["down"].status_code == 503
    problem = seen["down"].json()["failing"]["destination"]
    assert f"destination pacs (ORTHANC@127.0.0.1:{orthanc.dicom_port}) failed its last 1 send(s)" in problem
    assert "send attempt 1 failed" in problem
    assert seen["after"].status_code == 200, seen["after"].text


@pytest.mark.e2e
@pytest.mark.peers
def test_status_json_gives_the_timestamps_and_durations_of_a_round_trip(round_trip, t1_dir):
    node, orthanc, seen = round_trip
    [job] = [json.loads(line) for line in status_of(node.config_path, "--json").stdout.splitlines()]
    assert job["series_instance_uid"] == series_uid_of(t1_dir)
    stamps = [datetime.fromisoformat(job[key]) for key in
              ("received_at", "completed_at", "processing_at", "processed_at", "sent_at")]
    assert stamps == sorted(stamps), job
    assert all(stamp.utcoffset() is not None for stamp in stamps)
    durations = job["durations"]
    assert set(durations) == {"receiving", "queued", "processing", "sending"}
    assert all(isinstance(value, float) and value >= 0 for value in durations.values()), durations
    assert durations["processing"] > 1, "the phantom model takes seconds"
    assert durations["sending"] >= 2, "the first send failed; the next came after the retry delay"
    # the SEG is in Orthanc's study
    study = orthanc.get(f"/series/{seen['series'][0]}")["ParentStudy"]
    assert "SEG" in [s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study}/series")]


@pytest.mark.e2e
@pytest.mark.peers
def test_a_sent_job_whose_first_send_failed_shows_sent_and_its_last_error_apart(round_trip):
    node, _, _ = round_trip
    [job] = [json.loads(line) for line in status_of(node.config_path, "--json").stdout.splitlines()]
    assert job["state"] == "sent" and job["attempts"] == 2
    assert job["last_error"].startswith("pacs seg: send attempt 1 failed")
    assert "fail" not in job["reason"] and "segment(s)" in job["reason"]
    text = status_of(node.config_path).stdout
    assert text.splitlines()[:3] == ["workers: embedded warm runner, 0 series in flight, 0 job(s) waiting",
                                     f"destination pacs (ORTHANC@127.0.0.1:{node.config['destination']['port']}; seg):"
                                     " 0 pending, 1 sent, 0 failed", "sent: 1"]
    assert f"(last error: {job['last_error']})" in text
    assert "received " in text and "processed " in text and "sent " in text


@pytest.mark.e2e
@pytest.mark.peers
def test_status_into_head_exits_0_quietly(round_trip):
    node, _, _ = round_trip
    result = subprocess.run(["bash", "-o", "pipefail", "-c",
                             f"'{sys.executable}' -m dicom_node status --config '{node.config_path}' | head -n 1"],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "workers: embedded warm runner, 0 series in flight, 0 job(s) waiting\n", "")
