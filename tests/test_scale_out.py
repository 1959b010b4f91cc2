"""Scale-out over Celery and a real redis-server: two ``dicom-node worker`` processes
segment while the node stays the one DICOM endpoint and owns the state. Every series
ends with exactly one SEG at the destination (counted per C-STORE received), through a
lost worker, a Redis restart and a node restart. One worker with ``workers.slots: 2`` runs
two series at once, each in its own model process."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from dicom_node.store.state import JobState
from tests.derived import copy_series
from tests.support.asserts import assert_exactly_one_seg
from tests.support.dcmtk import storescu
from tests.support.node import CeleryWorker, NodeProcess, node_config
from tests.support.paths import free_port
from tests.support.redis import RedisServer
from tests.support.wait import process_alive, wait_until

pytestmark = pytest.mark.peers

SOURCE = "t1_siemens_3t_fl2d_sag_hfs"  # 35 slices: a few seconds per series on the phantom model


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def _worker_config(folder, redis_server, weights_dir) -> dict:
    return {
        "destination": {"ae_title": "UNUSED", "host": "127.0.0.1", "port": 1},  # workers never send
        "pipeline": {"model": {"weights_dir": str(weights_dir), "home_dir": str(folder / "totalseg")}},
        "workers": {"backend": "celery", "broker_url": redis_server.url, "max_in_flight": 2,
                    "visibility_timeout_seconds": 10},
        "http": {"port": 0},
    }


@pytest.fixture(scope="module")
def workers(tmp_path_factory, redis_server, phantom_weights):
    folder = tmp_path_factory.mktemp("workers")
    pool = [CeleryWorker(folder, _worker_config(folder, redis_server, phantom_weights), name) for name in ("w1", "w2")]
    yield pool
    for worker in pool:
        worker.stop(signal.SIGKILL)


@pytest.fixture
def two_workers(workers):
    """Both workers running (a test before may have killed one)."""
    for worker in workers:
        if not worker.alive:
            worker.start()
    return workers


@pytest.fixture
def node(tmp_path, pacs, redis_server, phantom_weights):
    process = NodeProcess(tmp_path / "node", node_config(
        tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=tmp_path / "no-weights-on-the-node",
        workers={"backend": "celery", "broker_url": redis_server.url, "max_in_flight": 2,
                 "visibility_timeout_seconds": 10},
    ))
    pacs.start()
    yield process
    if process.process is not None:
        process.stop(signal.SIGKILL)


def _series(mri_dir, tmp_path, count: int) -> list[str]:
    """``count`` copies of a shared T1 series with new UIDs; their SeriesInstanceUIDs."""
    uids = []
    for n in range(count):
        files = copy_series(mri_dir / SOURCE, tmp_path / f"series{n}", seed=f"scale-out-{tmp_path.name}-{n}")
        uids.append(_uid(files[0]))
    return uids


def _uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _send_all(node, tmp_path, count: int) -> None:
    for n in range(count):
        storescu(node.port, tmp_path / f"series{n}")


def _all_sent(node, count: int):
    jobs = node.jobs()
    failed = [j for j in jobs if j.state is JobState.FAILED]
    assert not failed, f"failed: {[(j.id, j.reason) for j in failed]}"
    return len(jobs) == count and all(j.state is JobState.SENT for j in jobs)


def _exactly_one_seg_each(pacs, uids) -> None:
    pacs.settle()
    for uid in uids:
        assert_exactly_one_seg(pacs, uid)
    assert len(pacs.receptions()) == len(uids), "nothing else arrived"


@pytest.mark.e2e
def test_six_series_each_get_exactly_one_seg_from_two_workers(node, pacs, two_workers, mri_dir, tmp_path):
    before = [worker.tasks_received() for worker in two_workers]
    uids = _series(mri_dir, tmp_path, 6)
    node.config["http"] = {"bind_address": "127.0.0.1", "port": free_port()}
    node.start()
    _send_all(node, tmp_path, 6)
    wait_until(lambda: _all_sent(node, 6), 600, 0.5, "six SEGs sent")
    _exactly_one_seg_each(pacs, uids)
    took = [worker.tasks_received() - b for worker, b in zip(two_workers, before)]
    assert sum(took) >= 6 and all(took), f"both workers took tasks: {took}"
    # the workers' reports: which model process ran each series, in the job and the metrics
    runs = [job.model_run for job in node.jobs()]
    assert all(run and " on cpu: load " in run for run in runs), runs
    assert len({run.split(" on ")[0] for run in runs}) == 2, f"two model processes: {runs}"
    metrics = requests.get(f"http://127.0.0.1:{node.config['http']['port']}/metrics", timeout=10).text
    assert metrics.count("dicom_node_model_runs_total{") == 2
    assert "dicom_node_worker_queue_depth 0.0" in metrics and "dicom_node_tasks_in_flight 0.0" in metrics
    status = node.cli("status").stdout
    assert status.splitlines()[0].startswith("workers: celery (queue dicom-node), 0 series in flight of at most 2")


@pytest.mark.e2e
def test_a_worker_killed_mid_task_still_gives_exactly_one_seg(node, pacs, two_workers, mri_dir, tmp_path):
    uids = _series(mri_dir, tmp_path, 1)
    node.start()
    before = [worker.tasks_received() for worker in two_workers]
    _send_all(node, tmp_path, 1)
    taker = wait_until(lambda: next((w for w, b in zip(two_workers, before) if w.tasks_received() > b), None),
                       120, 0.05, "a worker to take the task")
    taker.stop(signal.SIGKILL)  # mid-task: the task is unacknowledged
    wait_until(lambda: _all_sent(node, 1), 300, 0.5, "the SEG after the worker was lost")
    _exactly_one_seg_each(pacs, uids)


@pytest.mark.e2e
def test_redis_stopped_and_restarted_mid_run_loses_nothing(node, pacs, two_workers, redis_server, mri_dir,
                                                            tmp_path):
    uids = _series(mri_dir, tmp_path, 2)
    node.start()
    before = sum(worker.tasks_received() for worker in two_workers)
    _send_all(node, tmp_path, 2)
    wait_until(lambda: sum(w.tasks_received() for w in two_workers) > before, 120, 0.05, "a task taken")
    redis_server.stop()
    redis_server.start()  # the same port, empty
    wait_until(lambda: _all_sent(node, 2), 600, 0.5, "both SEGs after the Redis restart")
    _exactly_one_seg_each(pacs, uids)


@pytest.mark.e2e
def test_the_node_restarted_with_tasks_in_flight_loses_and_duplicates_nothing(node, pacs, two_workers, mri_dir,
                                                                               tmp_path):
    uids = _series(mri_dir, tmp_path, 3)
    node.start()
    before = sum(worker.tasks_received() for worker in two_workers)
    _send_all(node, tmp_path, 3)
    wait_until(lambda: sum(w.tasks_received() for w in two_workers) > before, 120, 0.05, "a task taken")
    node.stop(signal.SIGKILL)
    node.start()
    wait_until(lambda: _all_sent(node, 3), 600, 0.5, "three SEGs after the node restart")
    _exactly_one_seg_each(pacs, uids)


def test_a_worker_without_weights_fails_the_task_with_the_weights_message(tmp_path, pacs, redis_server, mri_dir):
    empty = tmp_path / "empty-weights"
    empty.mkdir()
    config = _worker_config(tmp_path, redis_server, empty)
    config["workers"]["queue"] = "no-weights"  # only this worker listens here
    worker = CeleryWorker(tmp_path / "worker", config, "bare").start()
    node = NodeProcess(tmp_path / "node", node_config(
        tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=empty,
        workers={**config["workers"]},
    ))
    try:
        pacs.start()
        copy_series(mri_dir / SOURCE, tmp_path / "series0", seed=f"bare-{tmp_path.name}")
        node.start()
        storescu(node.port, tmp_path / "series0")
        job = wait_until(lambda: next((j for j in node.jobs() if j.state is JobState.FAILED), None), 300, 0.5,
                         "the job to fail")
        assert "model weights for TotalSegmentator task 'total'" in job.reason
        assert str(empty) in job.reason, "the worker's own weights folder is named"
        assert pacs.receptions() == []
    finally:
        node.stop(signal.SIGKILL)
        worker.stop(signal.SIGKILL)


def _t1_image(mri_dir):
    """The shared T1 series preprocessed as the node sends it to a worker."""
    from pipeline.input.nifti import volume_to_nifti
    from pipeline.input.preprocess import PreprocessingMode, preprocess
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume

    volume = read_volume(load_series(sorted((mri_dir / SOURCE).glob("*.dcm"))))
    inverted = preprocess(volume.array, PreprocessingMode.INVERT_BLACK_BACKGROUND, clip_min=0, clip_max=3000,
                          background_percentile=1)
    return volume_to_nifti(volume.with_array(inverted))


def _two_at_once(tmp_path, redis_server, phantom_weights, image, queue: str, args: tuple[str, ...]):
    """Two requests submitted together to one worker (``workers.slots: 2``, ``args`` added to
    its command line): the replies, and the parent of each model process that ran them."""
    from dicom_node.config import WorkerSettings
    from dicom_node.remote.client import CeleryModels
    from pipeline.settings import ModelSettings

    config = _worker_config(tmp_path / queue, redis_server, phantom_weights)
    config["workers"].update(queue=queue, slots=2)  # only this worker listens here
    worker = CeleryWorker(tmp_path / queue, config, queue, args).start()
    models = CeleryModels(ModelSettings(weights_dir=tmp_path / "node-weights", timeout_seconds=600),
                          WorkerSettings(backend="celery", broker_url=redis_server.url, queue=queue,
                                         max_in_flight=2, visibility_timeout_seconds=10))
    try:
        with ThreadPoolExecutor(2) as submit:
            replies = list(submit.map(models.run, [image, image]))
        parents = [_parent_pid(int(reply.report.worker.rsplit(":", 1)[1])) for reply in replies]
        assert parents == [worker.process.pid] * 2, "the model processes are the worker's own"
        assert worker.tasks_received() == 2
    finally:
        models.close()
        worker.stop()
    for pid in {int(reply.report.worker.rsplit(":", 1)[1]) for reply in replies}:
        wait_until(lambda: not process_alive(pid), 30, 0.1, f"model process {pid} to end with its worker")
    return replies


def _parent_pid(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("PPid:")[1].split()[0])


@pytest.mark.e2e
def test_one_worker_with_two_slots_runs_two_series_at_once(tmp_path, redis_server, phantom_weights, mri_dir):
    image = _t1_image(mri_dir)
    both = _two_at_once(tmp_path, redis_server, phantom_weights, image, "slots-2", ())
    pids = {reply.report.worker for reply in both}
    assert len(pids) == 2, f"two model processes in one worker: {pids}"
    (a, b) = [(reply.report.started_at, reply.report.ended_at) for reply in both]
    assert max(a[0], b[0]) < min(a[1], b[1]), f"the two runs overlapped in time: {a}, {b}"

    # the control: the same worker held to one slot by --slots 1 runs them one after the other
    one = _two_at_once(tmp_path, redis_server, phantom_weights, image, "slots-1", ("--slots", "1"))
    assert len({reply.report.worker for reply in one}) == 1, "one model process"
    (a, b) = sorted((reply.report.started_at, reply.report.ended_at) for reply in one)
    assert 0 < a[1] <= b[0], f"one run after the other: {a}, {b}"

    reference = np.asanyarray(one[0].labels.dataobj)
    assert reference.any(), "the phantom model finds structures"
    for reply in (*both, one[1]):
        assert np.array_equal(np.asanyarray(reply.labels.dataobj), reference), "the same labels in every slot"
        assert reply.names == one[0].names
