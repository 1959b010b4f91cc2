"""Health, metrics, retention and logging of a node (in-process; the model is faked,
the network peers are real)."""

import json
import logging
import time

import pytest
import requests

from dicom_node.config import RetentionSettings
from dicom_node.logs import setup_logging
from dicom_node.store.retention import Retention
from dicom_node.store.state import JobState, JobUpdate
from tests.support.asserts import assert_exactly_one_seg
from tests.support.dcmtk import storescu
from tests.support.inprocess import inprocess_node
from tests.support.wait import wait_until


@pytest.fixture
def node(tmp_path, storescp):
    node = inprocess_node(tmp_path, storescp)
    node.start()
    yield node
    if not node._stop.is_set():
        node.stop()


def _get(node, path):
    return requests.get(f"http://127.0.0.1:{node.config.http.port}{path}", timeout=10)


@pytest.mark.peers
def test_healthz_is_200_when_all_is_up_and_503_naming_an_unwritable_state_store(node, tmp_path):
    response = _get(node, "/healthz")
    assert response.status_code == 200, response.text
    assert set(response.json()["checked"]) == {"scp", "worker", "state_store", "disk", "completion", "processing",
                                               "send:pacs", "retention", "notify", "stuck"}
    db = node.state.db.connection
    db.execute("PRAGMA query_only = ON")  # the database refuses writes, as a read-only disk would
    try:
        response = _get(node, "/healthz")
    finally:
        db.execute("PRAGMA query_only = OFF")
    assert response.status_code == 503
    assert list(response.json()["failing"]) == ["state_store"]


@pytest.mark.peers
def test_metrics_rise_after_a_series(node, t1_dir, storescp):
    def value(name, labels=""):
        for line in _get(node, "/metrics").text.splitlines():
            if line.startswith(name + labels + " "):
                return float(line.split()[-1])
        return 0.0

    before = value("dicom_node_instances_received_total")
    storescu(node.config.node.port, t1_dir)
    wait_until(lambda: storescp.receptions(), 60, 0.5, "the SEG")
    wait_until(lambda: value("dicom_node_jobs", '{state="sent"}') == 1, 10, 0.2, "the sent job")
    assert_exactly_one_seg(storescp)
    assert len(storescp.receptions()) == 1
    assert value("dicom_node_instances_received_total") == before + 35
    assert value("dicom_node_series_total", '{outcome="seg"}') == 1
    assert value("dicom_node_send_attempts_total", '{destination="pacs"}') == 1
    assert value("dicom_node_outbox", '{destination="pacs",state="sent"}') == 1
    assert value("dicom_node_stage_seconds_count", '{stage="segment"}') == 1


@pytest.mark.peers
def test_retention_removes_only_sent_jobs_older_than_the_limit(node, t1_dir, storescp, tmp_path):
    storescu(node.config.node.port, t1_dir)
    wait_until(lambda: node.state.job_counts().get(JobState.SENT), 60, 0.5, "the sent job")
    job = node.state.jobs()[0]
    retention = Retention(node.state, node.spool, RetentionSettings(days=1), 0)
    assert retention.plan() == []  # too young
    assert Retention(node.state, node.spool, RetentionSettings(days=0), 0).plan(time.time() + 9e9) == []  # kept
    items = retention.plan(now=time.time() + 2 * 86400)
    assert [[j.id for j in item.jobs] for item, _ in items] == [[job.id]]
    assert retention.paths(items[0][0]) == [job.series.folder, node.spool.result_folder(job.id)]
    assert len(retention.run(now=time.time() + 2 * 86400)) == 1
    assert not job.series.folder.exists() and not job.result_path.exists()
    assert node.state.job(job.id).state is JobState.SENT  # the row stays as the audit trail
    assert retention.plan(now=time.time() + 2 * 86400) == []


@pytest.mark.peers
def test_failed_jobs_go_after_their_own_period(node, t1_dir):
    storescu(node.config.node.port, t1_dir)
    wait_until(lambda: node.state.jobs() and node.state.jobs()[0].state is JobState.SENT, 60, 0.5, "the job")
    node.state.update_job(node.state.jobs()[0].id, JobState.FAILED, JobUpdate(reason="test"))
    retention = Retention(node.state, node.spool, RetentionSettings(days=1, failed_days=30), 0)
    assert retention.plan(now=time.time() + 10 * 86400) == []
    assert len(retention.plan(now=time.time() + 31 * 86400)) == 1


def test_json_logs(capsys):
    setup_logging("INFO", "json")
    logging.getLogger("dicom_node.test").info("job %d: sent", 7)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["message"] == "job 7: sent"
    setup_logging("INFO", "text")
