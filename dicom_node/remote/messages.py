"""What the node and its GPU workers say to each other over Celery: the task, its
request and its reply, all JSON (nothing travels as pickle).

A request is ``{"model": settings without the local keys, "preset": name, "image":
compressed NIfTI}``; the node's deadline for the run travels as the task's Celery time
limits (``soft_time_limit``: the model's ``timeout_seconds``), a header every worker
release accepts, so the model dict keeps the keys it had. A reply is the label image
(compressed), the label names and codes, the model's identity and its ``RunReport``,
or ``{"error": [kind, message]}``. The
client (``dicom_node.remote.client``) and the worker process
(``dicom_node.remote.worker``) both build their Celery application here.

An image is decompressed only up to a bound (``image_bytes_limit``: the reply's label
map lies on the request's grid; a worker takes no more voxels than its
``storage.max_series_voxels``), so a corrupt or forged message cannot fill the memory.
A result lives in Redis until the node has read it (then it is deleted) or
``RESULT_EXPIRES_SECONDS``, whichever comes first.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import zlib
from typing import Any

import nibabel as nib

from dicom_node.config import WorkerSettings
from pipeline.errors import SegmentationError, error_of_kind
from pipeline.labels import Code, SegmentInfo
from pipeline.model.types import ModelIdentity, ModelReply, RunReport

__all__ = ["TASK_NAME", "LOCAL_KEYS", "RESULT_EXPIRES_SECONDS", "make_app", "image_bytes_limit", "pack", "unpack",
           "encode_reply", "decode_reply"]

TASK_NAME = "dicom_node.segment"
# each worker's own; timeout_seconds only where the task names no time limit (an older node);
# compile is the worker's machine's choice (it does not change the labels)
LOCAL_KEYS = ("weights_dir", "home_dir", "device", "timeout_seconds", "compile")
# A result is read by the node within seconds of being stored (it polls every 2 s) and
# then deleted; one that nobody reads (the node gave up on the task, or restarted) goes
# after an hour instead of lying in Redis for a day.
RESULT_EXPIRES_SECONDS = 3600
_HEADER_BYTES = 2**20  # a NIfTI header and its extensions, generously


def make_app(settings: WorkerSettings):
    """The Celery application both sides use (JSON only, late acknowledgement)."""
    from celery import Celery

    broker = settings.broker()
    app = Celery("dicom_node", broker=broker, backend=broker)
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
        result_expires=RESULT_EXPIRES_SECONDS,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app



def image_bytes_limit(voxels: int) -> int:
    """The most an image of ``voxels`` voxels may decompress to: 8 bytes a voxel (the
    widest NIfTI type either side sends) and its header."""
    return voxels * 8 + _HEADER_BYTES


def pack(image: nib.Nifti1Image) -> str:
    return base64.b64encode(zlib.compress(image.to_bytes(), 1)).decode("ascii")


def unpack(text: str, max_bytes: int) -> nib.Nifti1Image:
    """The image of a message, decompressed to at most ``max_bytes`` (``SegmentationError``
    beyond, or when it is not base64 and zlib)."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(text, validate=True), max_bytes + 1)
    except (binascii.Error, zlib.error, ValueError, TypeError) as exc:
        raise SegmentationError(f"the image in a worker message cannot be read: {exc}") from exc
    if len(raw) > max_bytes:
        raise SegmentationError(f"the image in a worker message decompresses to more than {max_bytes} bytes, the"
                                " bound for its grid; refused")
    if not inflater.eof:
        raise SegmentationError("the image in a worker message is cut short (its zlib stream does not end)")
    return nib.Nifti1Image.from_bytes(raw)


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
        "labels": pack(reply.labels),
        "names": {str(k): v for k, v in reply.names.items()},
        "codes": _codes_to_json(reply.codes),
        "model": dataclasses.asdict(reply.model),
        "report": dataclasses.asdict(reply.report),
    }


def decode_reply(data: dict[str, Any], max_bytes: int) -> ModelReply:
    """The worker's reply; its label map decompressed to at most ``max_bytes``."""
    if "error" in data:
        kind, message = data["error"]
        raise error_of_kind(str(kind), str(message))
    return ModelReply(
        labels=unpack(data["labels"], max_bytes),
        names={int(k): v for k, v in data["names"].items()},
        codes=_codes_from_json(data["codes"]),
        model=ModelIdentity(**data["model"]),
        report=RunReport(**_known(RunReport, data["report"])),
    )


def _known(kind: type, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields ``kind`` has: a worker of a later release may report more (its extra
    timings are left out rather than failing the series), while one it lacks keeps its
    default."""
    names = {field.name for field in dataclasses.fields(kind)}
    return {key: value for key, value in fields.items() if key in names}
