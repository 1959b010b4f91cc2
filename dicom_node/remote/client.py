"""GPU workers over Celery and Redis, the node's side: the remote ``ModelService``.

The node stays the one DICOM endpoint and owns the state; a worker only segments. Each
series is one task, by value: the preprocessed volume as a compressed NIfTI and the
model settings without their local paths. The worker runs it on its own warm runner
(``pipeline.model.runner.ModelRunner``, with its own ``weights_dir``, ``home_dir`` and
``device``) and returns the label image, compressed, with the label names, the
model's identity and its ``RunReport``. Nothing travels as pickle: requests and
replies are JSON.

Delivery:

* Workers take one task at a time (``--pool solo``, prefetch 1) and acknowledge it
  only when it has ended (late acknowledgement). A worker that is lost (``kill -9``,
  a dead machine) leaves its task unacknowledged, and Redis delivers it again to
  another worker after ``workers.visibility_timeout_seconds``.
* The node waits for the result. When Redis is unreachable it waits for Redis to come
  back; when Redis came back empty (another ``run_id``: its queue and results may be
  gone) it submits the task again. A task computed twice is harmless: the node takes
  one result and sends once per job.
* Errors a worker's model raises (missing weights, a failing model) come back as the
  same ``PipelineError`` kind with the worker's message.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import nibabel as nib

from dicom_node.config import WorkerSettings
from dicom_node.remote.messages import LOCAL_KEYS, TASK_NAME, decode_reply, make_app, pack
from pipeline.errors import PipelineError, SegmentationError
from pipeline.model.types import ModelReply, RunnerStopped
from pipeline.settings import ModelSettings

__all__ = ["CeleryModels", "queue_depth"]

log = logging.getLogger(__name__)

_POLL_SECONDS = 2.0



class CeleryModels:
    """The ``ModelService`` that sends each request to a GPU worker and waits for it."""

    def __init__(self, model: ModelSettings, settings: WorkerSettings, preset: str | None = None) -> None:
        """``preset``: the model preset's name, by which a worker finds its own paths for it."""
        self.model = model
        self.preset = preset
        self.settings = settings
        self.app = make_app(settings)
        self._closed = threading.Event()

    def describe(self) -> str:
        return f"Celery workers (queue {self.settings.queue})"

    def request(self, image: nib.Nifti1Image) -> dict[str, Any]:
        """The task's one argument, JSON: the model without this machine's paths, the preset's name, the image."""
        return {"model": self.model.model_dump(mode="json", exclude=set(LOCAL_KEYS)), "preset": self.preset,
                "image": pack(image)}

    def run(self, image: nib.Nifti1Image) -> ModelReply:
        from celery.exceptions import TimeoutError as ResultTimeout

        request = self.request(image)
        delay = 1.0
        while not self._closed.is_set():
            try:
                run_id = self._redis_run_id()
                result = self.app.send_task(TASK_NAME, args=[request], queue=self.settings.queue)
                log.info("task %s submitted to the workers", result.id)
                while not self._closed.is_set():
                    try:
                        data = result.get(timeout=_POLL_SECONDS, propagate=True)
                    except ResultTimeout:
                        if self._redis_run_id() != run_id:
                            log.warning("task %s: Redis restarted meanwhile; submitting it again", result.id)
                            break
                        continue
                    return decode_reply(data)
            except (PipelineError, RunnerStopped):
                raise
            except Exception as exc:  # Redis unreachable, or the task raised
                if not _is_connection_error(exc):
                    raise SegmentationError(f"the worker failed: {type(exc).__name__}: {exc}") from exc
                log.warning("Redis (workers.broker_url) unreachable: %s; waiting %.0fs, then submitting again",
                            exc, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 30.0)
        raise RunnerStopped("the node is stopping")

    def _redis_run_id(self) -> str:
        import redis

        client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            return str(client.info("server")["run_id"])
        finally:
            client.close()

    def queue_depth(self) -> int | None:
        return queue_depth(self.settings)

    def close(self) -> None:
        self._closed.set()


def _is_connection_error(exc: BaseException) -> bool:
    import kombu.exceptions
    import redis

    while exc is not None:
        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            kombu.exceptions.OperationalError, ConnectionError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def queue_depth(settings: WorkerSettings) -> int | None:
    """Tasks waiting in the Redis queue, or None when Redis cannot be asked."""
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.llen(settings.queue))
        finally:
            client.close()
    except redis.exceptions.RedisError:
        return None
