"""GPU workers over Celery and Redis: the remote ``ModelService``.

The node stays the one DICOM endpoint and owns the state; a worker only segments. Each
series is one task, by value: the preprocessed volume as a compressed NIfTI and the
model settings without their local paths. The worker runs it on its own warm runner
(``pipeline.runner.ModelRunner``, with its own ``weights_dir``, ``home_dir`` and
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

import base64
import dataclasses
import logging
import os
import threading
import zlib
from typing import Any

import nibabel as nib

from dicom_node.config import Config, WorkerSettings
from pipeline.errors import PipelineError, SegmentationError, error_of_kind
from pipeline.labels import Code, SegmentInfo
from pipeline.model_identity import ModelIdentity
from pipeline.runner import ModelReply, ModelRunner, RunnerStopped, RunReport
from pipeline.settings import ModelSettings

__all__ = ["TASK_NAME", "make_app", "CeleryModels", "run_worker", "queue_depth"]

log = logging.getLogger(__name__)

TASK_NAME = "dicom_node.segment"
_LOCAL_KEYS = ("weights_dir", "home_dir", "device")  # each worker's own
_POLL_SECONDS = 2.0


def make_app(settings: WorkerSettings):
    """The Celery application both sides use (JSON only, late acknowledgement)."""
    from celery import Celery

    app = Celery("dicom_node", broker=settings.broker_url, backend=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


# --- the wire format -----------------------------------------------------------------

def _pack(image: nib.Nifti1Image) -> str:
    return base64.b64encode(zlib.compress(image.to_bytes(), 1)).decode("ascii")


def _unpack(text: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(zlib.decompress(base64.b64decode(text)))


def _codes_to_json(codes) -> dict | None:
    return None if codes is None else {name: dataclasses.asdict(info) for name, info in codes.items()}


def _codes_from_json(data: dict | None):
    if data is None:
        return None

    def code(value):
        return None if value is None else Code(**value)

    return {
        name: SegmentInfo(**{**info, "category": code(info["category"]), "property_type": code(info["property_type"]),
                             "type_modifier": code(info["type_modifier"]), "region": code(info.get("region")),
                             "region_modifier": code(info.get("region_modifier")), "rgb": tuple(info["rgb"])})
        for name, info in data.items()
    }


def encode_reply(reply: ModelReply) -> dict[str, Any]:
    return {
        "labels": _pack(reply.labels),
        "names": {str(k): v for k, v in reply.names.items()},
        "codes": _codes_to_json(reply.codes),
        "model": dataclasses.asdict(reply.model),
        "report": dataclasses.asdict(reply.report),
    }


def decode_reply(data: dict[str, Any]) -> ModelReply:
    if "error" in data:
        kind, message = data["error"]
        raise error_of_kind(str(kind), str(message))
    return ModelReply(
        labels=_unpack(data["labels"]),
        names={int(k): v for k, v in data["names"].items()},
        codes=_codes_from_json(data["codes"]),
        model=ModelIdentity(**data["model"]),
        report=RunReport(**data["report"]),
    )


# --- the node's side -------------------------------------------------------------------

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
        return {"model": self.model.model_dump(mode="json", exclude=set(_LOCAL_KEYS)), "preset": self.preset,
                "image": _pack(image)}

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


# --- the worker's side -----------------------------------------------------------------

class _WorkerModels:
    """The worker process's warm runners, one per model. Each takes the worker's own
    paths and device from the worker's preset of the same name (else its first preset)."""

    def __init__(self, local: dict[str, ModelSettings]) -> None:
        self.local = local
        self.runners: dict[str, ModelRunner] = {}

    def settings_for(self, request: dict[str, Any]) -> ModelSettings:
        """The request's model with this worker's paths and device for its preset."""
        local = self.local.get(request.get("preset") or "", next(iter(self.local.values())))
        return ModelSettings.model_validate({**request["model"], **{key: getattr(local, key) for key in _LOCAL_KEYS}})

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        settings = self.settings_for(request)
        key = settings.model_dump_json()
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = ModelRunner(settings)
        try:
            return encode_reply(runner.run(_unpack(request["image"])))
        except PipelineError as exc:
            log.warning("task failed: %s", exc)
            return {"error": [type(exc).__name__, str(exc)]}

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()


def run_worker(config: Config, *, name: str | None = None) -> int:
    """Run a Celery worker (one process, one task at a time) until it is stopped."""
    app = make_app(config.workers)
    models = _WorkerModels({preset.name: preset.settings for preset in config.models})
    app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)(models.run)
    hostname = name or f"dicom-node-{os.getpid()}@%h"
    try:
        app.worker_main([
            "worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1", "--without-gossip",
            "--without-mingle", "--without-heartbeat", f"--queues={config.workers.queue}", f"--hostname={hostname}",
            f"--loglevel={config.logging.level}",
        ])
    finally:
        models.close()
    return 0
