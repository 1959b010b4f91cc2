"""A GPU worker: the ``dicom-node worker`` process, one Celery worker with a warm model
runner per model preset and slot (``pipeline.model.runner.ModelRunner``, with this machine's own
``weights_dir``, ``home_dir`` and ``device``).

It takes ``workers.slots`` tasks at a time (``--slots``; 1: ``--pool solo``, more:
``--pool threads`` with that concurrency; prefetch 1 per slot) and acknowledges each only
when it has ended (late acknowledgement), so a worker that is lost leaves its tasks to
another. Each slot has its own set of warm runners (one model process per preset and
slot), handed to one task at a time, so two series on one worker share the GPU without
waiting for each other's pre- and post-processing, and no runner ever serves two tasks
at once. A model error goes back as a reply naming its ``PipelineError`` kind. The
runner stops a model that has not answered within the task's soft time limit (the
node's ``timeout_seconds``; this worker's own where the task names none): neither the
solo nor the threads pool enforces a Celery time limit itself, so the runner's deadline
is the one that holds.
"""

from __future__ import annotations

import logging
import os
import queue
from typing import Any

from dicom_node.config import Config
from dicom_node.remote.messages import LOCAL_KEYS, TASK_NAME, encode_reply, image_bytes_limit, make_app, unpack
from pipeline.errors import PipelineError
from pipeline.model.runner import ModelRunner
from pipeline.settings import ModelSettings

__all__ = ["run_worker"]

log = logging.getLogger(__name__)



class _WorkerModels:
    """One slot's warm runners, one per model. Each takes the worker's own
    paths and device from the worker's preset of the same name (else its first preset).
    A request's image is decompressed to at most ``max_bytes`` (from the worker's own
    ``storage.max_series_voxels``)."""

    def __init__(self, local: dict[str, ModelSettings], max_bytes: int) -> None:
        self.local = local
        self.max_bytes = max_bytes
        self.runners: dict[str, ModelRunner] = {}

    def settings_for(self, request: dict[str, Any]) -> ModelSettings:
        """The request's model with this worker's paths and device for its preset."""
        local = self.local.get(request.get("preset") or "", next(iter(self.local.values())))
        return ModelSettings.model_validate({**request["model"], **{key: getattr(local, key) for key in LOCAL_KEYS}})

    def run(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """One task; ``timeout``: its deadline (None: the preset's ``timeout_seconds``)."""
        settings = self.settings_for(request)
        key = settings.model_dump_json()
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = ModelRunner(settings)
        try:
            return encode_reply(runner.run(unpack(request["image"], self.max_bytes), timeout=timeout))
        except PipelineError as exc:
            log.warning("task failed: %s", exc)
            return {"error": [type(exc).__name__, str(exc)]}

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()


def run_worker(config: Config, *, name: str | None = None, slots: int | None = None) -> int:
    """Run a Celery worker (one process, ``slots`` tasks at a time: ``workers.slots``
    unless given) until it is stopped."""
    slots = slots or config.workers.slots
    app = make_app(config.workers)
    local = {preset.name: preset.settings for preset in config.models}
    max_bytes = image_bytes_limit(config.storage.max_series_voxels)
    sets = [_WorkerModels(local, max_bytes) for _ in range(slots)]
    free: queue.SimpleQueue[_WorkerModels] = queue.SimpleQueue()  # a slot's runners, out to one task at a time
    for models in sets:
        free.put(models)

    def segment(task, request: dict[str, Any]) -> dict[str, Any]:
        hard, soft = getattr(task.request, "timelimit", None) or (None, None)
        models = free.get()  # never waits: the pool runs at most ``slots`` tasks at once
        try:
            return models.run(request, timeout=soft or hard)
        finally:
            free.put(models)

    app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)(segment)
    hostname = name or f"dicom-node-{os.getpid()}@%h"
    pool = "--pool=solo" if slots == 1 else "--pool=threads"
    try:
        app.worker_main([
            "worker", pool, f"--concurrency={slots}", "--prefetch-multiplier=1", "--without-gossip",
            "--without-mingle", "--without-heartbeat", f"--queues={config.workers.queue}", f"--hostname={hostname}",
            f"--loglevel={config.logging.level}",
        ])
    finally:
        for models in sets:
            models.close()
    return 0
