"""No stage that hangs: a model run has a deadline (``models[].timeout_seconds``), the
job whose model missed it twice fails with that reason and frees the processing slot,
and ``/healthz`` names every thread of the node and a run stuck past its deadline.

The hang is a real one, nothing in the product is made for the test: the preset's
TotalSegmentator home folder holds ``config.json`` as a FIFO that nobody writes, so the
model process blocks in ``open()`` when the back-end reads it (as on a hung network
mount). A model process frozen with SIGSTOP (as a debugger, a cgroup freezer or a hung
driver leaves it) ignores SIGTERM until it is killed: that is the window in which
``/healthz`` says "stuck".
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from dicom_node.config import WorkerSettings
from dicom_node.store.state import JobState
from pipeline.errors import ModelTimeoutError
from pipeline.input.nifti import volume_to_nifti
from pipeline.input.preprocess import PreprocessingMode, preprocess
from pipeline.input.series import load_series
from pipeline.input.volume import read_volume
from pipeline.model.runner import ModelRunner
from pipeline.model.types import LabelMap
from pipeline.settings import ModelSettings
from tests.derived import copy_series
from tests.support.asserts import assert_exactly_one_seg, series_uid_of
from tests.support.dcmtk import storescu
from tests.support.inprocess import inprocess_node
from tests.support.node import CeleryWorker, node_fixture, node_settled
from tests.support.paths import free_port
from tests.support.redis import RedisServer
from tests.support.wait import log_has, process_alive, wait_until


def hung_home(folder: Path) -> Path:
    """A TotalSegmentator home folder whose ``config.json`` is a FIFO nobody writes."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "config.json")
    return folder


def small_image() -> nib.Nifti1Image:
    return nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.float32), np.eye(4))


@pytest.fixture(scope="module")
def t1_image(t1_dir) -> nib.Nifti1Image:
    volume = read_volume(load_series(sorted(t1_dir.glob("*.dcm"))))
    inverted = preprocess(volume.array, PreprocessingMode.INVERT_BLACK_BACKGROUND,
                          clip_min=0, clip_max=3000, background_percentile=1)
    return volume_to_nifti(volume.with_array(inverted))


# --- the embedded runner ------------------------------------------------------------------


@pytest.mark.e2e
def test_a_hung_model_fails_at_its_deadline_and_the_runner_works_again(phantom_weights, tmp_path, t1_image):
    home = hung_home(tmp_path / "home")
    with ModelRunner(ModelSettings(weights_dir=phantom_weights, home_dir=home, timeout_seconds=600)) as runner:
        hung = runner.pid
        start = time.monotonic()
        with pytest.raises(ModelTimeoutError, match=r"^the model did not answer within 3 s$"):
            runner.run(t1_image, timeout=3)
        elapsed = time.monotonic() - start
        assert 3 <= elapsed < 8, f"raised after {elapsed:.1f} s"  # SIGTERM ends a blocked read at once
        assert not process_alive(hung), "the hung model process was stopped"
        assert runner.overdue(0) is None

        (home / "config.json").unlink()  # the mount is back
        reply = runner.run(t1_image)
        assert np.asanyarray(reply.labels.dataobj).any(), "the phantom model finds structures"
        assert runner.starts == 2 and runner.pid != hung


def test_a_frozen_model_process_is_killed_and_overdue_until_it_is_gone(tmp_path):
    runner = ModelRunner(ModelSettings(weights_dir=tmp_path / "weights", home_dir=hung_home(tmp_path / "home")))
    runner.start()
    frozen = runner.pid
    os.kill(frozen, signal.SIGSTOP)  # it reads nothing, and SIGTERM waits until it runs again
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(small_image(), timeout=1)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    try:
        stuck = wait_until(lambda: runner.overdue(0.5), 10, 0.05, "the run to be reported overdue")
        assert "past its deadline of 1 s" in stuck and f"model process {frozen}" in stuck
        thread.join(30)
        elapsed = time.monotonic() - start
        assert len(outcome) == 1 and isinstance(outcome[0], ModelTimeoutError), outcome
        assert str(outcome[0]) == "the model did not answer within 1 s"
        assert 5 < elapsed < 15, f"SIGTERM, then SIGKILL after the grace: {elapsed:.1f} s"
        assert not process_alive(frozen)
        assert runner.overdue(0.5) is None
    finally:
        if process_alive(frozen):
            os.kill(frozen, signal.SIGKILL)
        runner.close()


# --- /healthz names every thread ------------------------------------------------------------


class ExitingSegmenter:
    """A segmenter in the node's process whose library calls ``sys.exit``: the processing
    thread's last guard catches ``Exception`` only, so the thread ends."""

    def describe(self) -> str:
        return "exiting"

    def segment(self, volume) -> LabelMap:
        raise SystemExit(3)


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's SystemExit
def test_healthz_names_each_thread_and_a_dead_one(tmp_path, storescp, t1_dir):
    node = inprocess_node(tmp_path, storescp, segmenter=ExitingSegmenter(), completion={"stable_seconds": 1})
    config = node.config
    node.start()
    url = f"http://127.0.0.1:{config.http.port}/healthz"
    try:
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 200, answer.text
        assert set(answer.json()["checked"]) == {"scp", "worker", "state_store", "disk", "completion", "processing",
                                                 "send:pacs", "retention", "notify", "stuck"}

        storescu(config.node.port, t1_dir)  # its job ends the processing thread
        failing = wait_until(lambda: (r := requests.get(url, timeout=10)).status_code == 503 and r.json()["failing"],
                             60, 0.2, "the dead processing thread in /healthz")
        assert failing["processing"] == "processing thread(s) not running: processing-1"
        assert set(failing) == {"processing", "worker"}

        node.completion.stop()
        failing = requests.get(url, timeout=10).json()["failing"]
        assert failing["completion"] == "the completion thread is not running"
        assert set(failing) == {"processing", "worker", "completion"}
    finally:
        node.stop()


# --- the node: the hung job fails after one more try, the next series gets its SEG ----------

node = node_fixture(completion={"stable_seconds": 2, "complete_on_release": True})


@pytest.mark.e2e
@pytest.mark.peers
def test_a_hung_model_fails_its_job_after_one_retry_and_the_next_series_gets_its_seg(node, pacs, t1_dir,
                                                                                   phantom_weights, tmp_path):
    """Series from ORTHANC go to the preset ``frozen`` (its first model process frozen,
    the next one blocked on the FIFO), the others to ``phantom``: one processing slot."""
    del node.config["pipeline"]["model"]
    node.config["models"] = [
        {"name": "frozen", "weights_dir": str(phantom_weights), "home_dir": str(hung_home(tmp_path / "hung")),
         "timeout_seconds": 3},
        {"name": "phantom", "weights_dir": str(phantom_weights), "home_dir": str(tmp_path / "totalseg")},
    ]
    node.config["rules"] = [
        {"name": "orthanc", "match": {"calling_ae_title": ["ORTHANC"]}, "models": ["frozen"]},
        {"name": "the-rest", "match": {}, "models": ["phantom"]},
    ]
    node.config["http"] = {"port": free_port()}
    node.start()
    pacs.start()
    url = f"http://127.0.0.1:{node.config['http']['port']}/healthz"
    marker = "(model preset frozen)"
    line = wait_until(lambda: next((line for line in node.log().splitlines() if marker in line), None), 60, 0.1,
                      "the frozen preset's model process")
    frozen = int(line.split("(pid ")[1].split(")")[0])
    os.kill(frozen, signal.SIGSTOP)

    answers: list[tuple[int, dict]] = []
    polling = threading.Event()

    def poll() -> None:  # /healthz while the hung job runs
        while not polling.is_set():
            response = requests.get(url, timeout=10)
            answers.append((response.status_code, response.json()))
            polling.wait(0.2)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        storescu(node.port, t1_dir, calling="ORTHANC")
        job = wait_until(lambda: [j for j in node.jobs() if j.state is JobState.FAILED], 120, 0.2,
                         "the hung job to fail")[0]
    finally:
        polling.set()
        poller.join()
        if process_alive(frozen):
            os.kill(frozen, signal.SIGKILL)
    assert job.reason == "the model did not answer within 3 s (tried twice)", job.reason
    stuck = [body["failing"]["stuck"] for status, body in answers if status == 503 and "stuck" in body["failing"]]
    assert stuck, f"/healthz never said stuck: {answers}"
    assert stuck[0].startswith("model frozen: TotalSegmentator: a run has taken")
    assert f"past its deadline of 3 s (timeout_seconds), model process {frozen}" in stuck[0]
    log = node.log()
    assert "did not end; killing it" in log and log.count("did not answer in time; stopping it") == 2
    assert "model process started again" in log and "trying once more" in log

    second = copy_series(t1_dir, tmp_path / "second", "deadlines")
    storescu(node.port, second)
    wait_until(lambda: node_settled(node, 2), 300, 0.5, "the second series' job")
    assert [j.state for j in sorted(node.jobs(), key=lambda j: j.id)] == [JobState.FAILED, JobState.SENT]
    pacs.settle()
    assert_exactly_one_seg(pacs, series_uid_of(second[0]))
    assert len(pacs.receptions()) == 1, "nothing of the hung job was sent"
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, answer.text


# --- Celery: the worker's runner and the node's own wait ------------------------------------


@pytest.mark.peers
def test_celery_a_hung_task_and_a_frozen_worker_both_end_in_the_deadline_error(tmp_path, phantom_weights):
    from dicom_node.remote.client import CeleryModels

    redis = RedisServer(tmp_path / "redis").start()
    worker = CeleryWorker(tmp_path / "worker", {
        "destination": {"ae_title": "UNUSED", "host": "127.0.0.1", "port": 1},  # workers never send
        "models": [{"name": "frozen", "weights_dir": str(phantom_weights),
                    "home_dir": str(hung_home(tmp_path / "worker-home"))}],  # its own timeout: the default hour
        "workers": {"backend": "celery", "broker_url": redis.url, "visibility_timeout_seconds": 10},
        "http": {"port": 0},
    }, "hung")
    models = CeleryModels(ModelSettings(weights_dir=tmp_path / "node-weights", timeout_seconds=3),
                          WorkerSettings(backend="celery", broker_url=redis.url, visibility_timeout_seconds=10),
                          preset="frozen")
    try:
        worker.start()
        # the worker's runner takes the task's soft time limit (3 s) and says so by name
        start = time.monotonic()
        with pytest.raises(ModelTimeoutError, match=r"^the model did not answer within 3 s$"):
            models.run(small_image())
        assert time.monotonic() - start < 13, "the worker answered before the node's own deadline"

        # a frozen worker answers nothing: the node stops waiting after 3 + 10 s
        os.kill(worker.process.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ModelTimeoutError) as raised:
            models.run(small_image())
        assert 13 <= time.monotonic() - start < 20
        message = str(raised.value)
        assert message.startswith("the model did not answer within 3 s (Celery task ")
        task = message.split("Celery task ")[1].split(":")[0]
        os.kill(worker.process.pid, signal.SIGCONT)
        # the late task has expired: the worker drops it instead of running it
        wait_until(lambda: log_has(worker.log_path, f"Discarding revoked task: dicom_node.segment[{task}]"), 30, 0.2,
                   "the worker to drop the expired task")
    finally:
        models.close()
        if worker.process is not None:
            os.kill(worker.process.pid, signal.SIGCONT)
        worker.stop(signal.SIGKILL)
        redis.stop()
