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
* Each task has a deadline. The worker's runner stops a model that has not answered
  within the preset's ``timeout_seconds`` (the task's ``soft_time_limit``; the hard
  ``time_limit`` gives it time to stop the process) and answers ``ModelTimeoutError``.
  The node waits ``timeout_seconds`` plus ``workers.visibility_timeout_seconds`` for
  the queue: the time a task may wait for a free worker, or for Redis to deliver it
  again after its worker was lost. Then it stops waiting and raises the same
  ``ModelTimeoutError``; the task ``expires`` then, so a worker that gets it later
  drops it, and a late result is never read (a new try is a new task).
* A result is deleted from Redis as soon as the node has read it (it is a patient's
  label map); one never read expires after an hour. Its label map is decompressed only
  up to the size the request's grid allows.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import nibabel as nib
import numpy as np

from dicom_node.config import WorkerSettings
from dicom_node.errors import ConfigError
from dicom_node.remote.messages import LOCAL_KEYS, TASK_NAME, decode_reply, image_bytes_limit, make_app, pack
from pipeline.errors import ModelTimeoutError, PipelineError, SegmentationError
from pipeline.model.types import ModelReply, RunnerStopped
from pipeline.settings import ModelSettings

__all__ = ["CeleryModels", "queue_depth", "take_result"]

log = logging.getLogger(__name__)

_POLL_SECONDS = 2.0
_STOP_MARGIN_SECONDS = 30.0  # the hard time limit past the soft one: the worker's runner stops its model



class CeleryModels:
    """The ``ModelService`` that sends each request to a GPU worker and waits for it."""

    def __init__(self, model: ModelSettings, settings: WorkerSettings, preset: str | None = None) -> None:
        """``preset``: the model preset's name, by which a worker finds its own paths for it."""
        self.model = model
        self.preset = preset
        self.settings = settings
        self.broker_url = settings.broker()  # read once: from the config, its file or its variable
        self.app = make_app(settings)
        self._closed = threading.Event()
        self._in_flight: dict[int, float] = {}  # each waiting call's submission (monotonic), by a token
        self._tokens = itertools.count()

    def describe(self) -> str:
        return f"Celery workers (queue {self.settings.queue})"

    @property
    def deadline_seconds(self) -> float:
        """How long the node waits for a task: the model's deadline and the queue's margin."""
        return self.model.timeout_seconds + self.settings.visibility_timeout_seconds

    def overdue(self, margin: float) -> str | None:
        """The oldest task still awaited once it is ``margin`` s past the node's deadline."""
        started = min(list(self._in_flight.values()), default=None)
        age = 0.0 if started is None else time.monotonic() - started
        if started is None or age <= self.deadline_seconds + margin:
            return None
        return (f"{self.describe()}: a task has been awaited {age:.0f} s, past the node's deadline of"
                f" {self.deadline_seconds:g} s")

    def request(self, image: nib.Nifti1Image) -> dict[str, Any]:
        """The task's one argument, JSON: the model without this machine's paths, the preset's name, the image."""
        return {"model": self.model.model_dump(mode="json", exclude=set(LOCAL_KEYS)), "preset": self.preset,
                "image": pack(image)}

    def run(self, image: nib.Nifti1Image) -> ModelReply:
        request = self.request(image)
        token = next(self._tokens)
        try:
            return self._submit_and_wait(request, token, image_bytes_limit(int(np.prod(image.shape))))
        finally:
            self._in_flight.pop(token, None)

    def _submit_and_wait(self, request: dict[str, Any], token: int, max_bytes: int) -> ModelReply:
        from celery.exceptions import TimeoutError as ResultTimeout

        timeout, wait = self.model.timeout_seconds, self.deadline_seconds
        delay = 1.0
        while not self._closed.is_set():
            try:
                run_id = self._redis_run_id()
                result = self.app.send_task(TASK_NAME, args=[request], queue=self.settings.queue,
                                            soft_time_limit=timeout, time_limit=timeout + _STOP_MARGIN_SECONDS,
                                            expires=wait)
                log.info("task %s submitted to the workers", result.id)
                self._in_flight[token] = submitted = time.monotonic()
                while not self._closed.is_set():
                    left = submitted + wait - time.monotonic()
                    if left <= 0:
                        log.error("task %s: no answer within %g s; not waiting any longer (a late result is"
                                  " ignored)", result.id, wait)
                        raise ModelTimeoutError(f"the model did not answer within {timeout:g} s (Celery task"
                                                f" {result.id}: no answer {wait:g} s after it was queued)")
                    try:
                        data = take_result(result, min(_POLL_SECONDS, left))
                    except ResultTimeout:
                        if self._redis_run_id() != run_id:
                            log.warning("task %s: Redis restarted meanwhile; submitting it again", result.id)
                            break
                        continue
                    return decode_reply(data, max_bytes)
            except (PipelineError, RunnerStopped):
                raise
            except Exception as exc:  # Redis unreachable, or the task raised
                if not _is_connection_error(exc):
                    raise SegmentationError(f"the worker failed: {type(exc).__name__}: {exc}") from exc
                self._in_flight.pop(token, None)  # no task awaited while Redis is away
                log.warning("Redis (workers.broker_url) unreachable: %s; waiting %.0fs, then submitting again",
                            exc, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 30.0)
        raise RunnerStopped("the node is stopping")

    def _redis_run_id(self) -> str:
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            return str(client.info("server")["run_id"])
        finally:
            client.close()

    def queue_depth(self) -> int | None:
        return queue_depth(self.settings)

    def close(self) -> None:
        self._closed.set()


def take_result(result, timeout: float) -> Any:
    """A task's result (Celery's ``TimeoutError`` while it has none), deleted from Redis
    once read. A delete that fails because Redis went away is logged: the result
    expires by itself."""
    data = result.get(timeout=timeout, propagate=True)
    try:
        result.forget()
    except Exception as exc:
        if not _is_connection_error(exc):
            raise
        log.warning("task %s: its result could not be deleted from Redis (%s); it expires by itself", result.id, exc)
    return data


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
        client = redis.Redis.from_url(settings.broker(), socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.llen(settings.queue))
        finally:
            client.close()
    except (redis.exceptions.RedisError, ConfigError):
        return None
