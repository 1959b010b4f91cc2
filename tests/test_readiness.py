"""``/readyz``: 503 naming the missing weights path until the weights are imported, 503
naming the destination once it failed its last N sends; ``/healthz`` stays liveness.
(The destination on a running node is checked in ``tests/test_status.py``, whose round
trip has Orthanc down for the first send.)"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import requests

from dicom_node.config import Destination
from dicom_node.store.state import SeriesRef, StateStore
from dicom_node.web.http import destination_check
from tests.conftest import CHECKPOINT
from tests.support.node import NodeProcess, node_config
from tests.support.paths import free_port
from tests.support.wait import wait_until


def _failed_send(state: StateStore, item: int, attempt: int, now: float) -> None:
    state.record_send(item, ok=False, error=f"send attempt {attempt} failed: connection refused", retry_at=now + 1,
                      now=now)


def test_the_destination_is_not_ready_after_its_last_n_sends_failed(tmp_path):
    state = StateStore(tmp_path / "s.db")
    ref = SeriesRef("1.2.3", "1.2.3.1", "MODALITY", tmp_path)
    state.record_instance(ref, "1.2.3.1.1", "1.2", tmp_path / "a", now=1)
    job = state.complete_series("1.2.3.1", now=2)
    state.claim_next_processing(now=3)
    state.start_sending(job, [("pacs", "seg", tmp_path), ("archive", "seg", tmp_path)], now=4)
    pacs, archive = sorted(state.outbox(job), key=lambda item: item.destination != "pacs")
    destinations = [Destination(name="pacs", ae_title="PACS", host="10.1.2.3", port=104),
                    Destination(name="archive", protocol="dicomweb", url="https://archive.example.org/dicom-web")]
    check = destination_check(state, destinations, 3)
    assert check() is None  # no send yet
    _failed_send(state, pacs.id, 1, 5)
    _failed_send(state, pacs.id, 2, 6)
    state.record_send(archive.id, ok=True, now=6.5)  # the other destination does not count
    assert check() is None  # two of three
    _failed_send(state, pacs.id, 3, 7)
    assert check() == ("destination pacs (PACS@10.1.2.3:104) failed its last 3 send(s);"
                       " last error: send attempt 3 failed: connection refused")
    assert destination_check(state, destinations, 0)() is None  # 0 turns the check off
    state.record_send(pacs.id, ok=True, now=8)
    assert check() is None  # a send went through
    state.close()


@pytest.fixture
def weightless_node(tmp_path, storescp):
    weights = tmp_path / "weights"
    # a destination that answers the node's echo at start: only the weights are missing
    config = node_config(tmp_path / "node", destination=(storescp.ae_title, storescp.port), weights_dir=weights,
                         http={"port": free_port()})
    node = NodeProcess(tmp_path / "node", config).start()
    yield node, weights
    node.stop(signal.SIGKILL)


@pytest.mark.peers
def test_not_ready_naming_the_missing_weights_until_they_are_imported(weightless_node, phantom_weights):
    node, weights = weightless_node
    base = f"http://127.0.0.1:{node.config['http']['port']}"
    assert requests.get(base + "/healthz", timeout=10).status_code == 200  # alive all the same
    wait_until(lambda: "echo:pacs" not in requests.get(base + "/readyz", timeout=30).json()["failing"], 30, 0.1,
               "the destination's answer to the echo at start")
    answer = requests.get(base + "/readyz", timeout=30)
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "not ready" and set(body["failing"]) == {"weights"}
    assert str(weights / CHECKPOINT) in body["failing"]["weights"]
    assert "dicom-node weights import" in body["failing"]["weights"]
    # what the operator reads at start says what to do now, not what to do with a job
    wait_until(lambda: "weights import" in node.log(), 30, 0.2, "the start-up message about the weights")
    assert "retry JOB_ID" not in node.log()

    imported = subprocess.run([sys.executable, "-m", "dicom_node", "weights", "import", str(phantom_weights),
                               "--config", str(node.config_path)], capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    answer = requests.get(base + "/readyz", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready", "failing": {},
                             "checked": ["audit", "completion", "database", "destination", "disk", "echo:pacs",
                                         "notify", "processing", "retention", "scp", "send:pacs", "state_store", "stuck",
                                         "weights", "worker"]}
    assert requests.get(base + "/nothing", timeout=10).status_code == 404
    assert requests.get(base + "/", timeout=10).status_code == 404  # the status page is off by default

