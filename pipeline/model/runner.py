"""The warm model runner: one long-lived process that loads the model once and then
segments volume after volume.

``ModelRunner`` starts a process with ``spawn`` (a process forked from the node's many
threads can inherit a held lock and hang; the model's environment variables, library
globals and any crash or leak stay out of the node). The process builds the back-end
the settings name (``pipeline.model.totalseg.TotalSegBackend`` or
``pipeline.model.nnunet.NnUNetBackend``), which keeps nnU-Net's predictors initialised
between requests, and then answers requests over a pipe: an image in, a
``ModelReply`` out (the label image, the label names and codes, the model's identity,
and a ``RunReport`` with the load count, the time of each stage and the request's start
and end).

An image travels as its voxel buffer and its geometry, never as a file or a serialised
NIfTI: a small header (shape, dtype, memory order, affine) and then the raw bytes,
which the model process reads straight into the array it segments. The process builds
its back-end (the model libraries' imports, seconds) as soon as it starts, while the
node is still reading the first series; a back-end that cannot be built is built again
at the first request, which then fails with the reason.

* A runner that dies (killed, out of memory) is started again and the request is sent
  once more; a second death fails the request with the reason
  (``SegmentationError``). Errors the back-end raises (missing weights, a failing
  model) come back as the same ``PipelineError`` kind with the same message.
* Every request has a deadline (``timeout_seconds``): a model that has not answered by
  then (a hung GPU, a read that never returns) has its process stopped (SIGTERM, then
  SIGKILL) and the request fails with ``ModelTimeoutError``; the next request starts a
  fresh process. ``overdue`` tells the node's ``/healthz`` about a request past its
  deadline that is not ending, and about a process that outlived SIGKILL.
* The process watches its parent and exits when the parent is gone, even after
  ``kill -9`` of the parent, so no model process outlives the node.
* ``close()`` stops it; a request that ``close()`` interrupts raises ``RunnerStopped``
  (the job is handed back, not failed).

``ModelService`` is the small interface the node uses: ``ModelRunner`` is the
embedded implementation, ``dicom_node.remote.client.CeleryModels`` sends the same
request to a GPU worker over Celery. ``run_model_on_nifti`` is the cold path (a fresh
process per image, which loads the model every time), kept as the comparison in
``bench/throughput.py`` and as the reference in the equality tests.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from pipeline.errors import ModelTimeoutError, PipelineError, SegmentationError, error_of_kind
from pipeline.model.types import Backend, ModelReply, RunnerStopped
from pipeline.settings import ModelSettings

__all__ = ["ModelRunner", "make_backend", "ModelChild", "run_model_on_nifti"]

log = logging.getLogger(__name__)

_PARENT_CHECK_SECONDS = 0.5
_STOP_SECONDS = 5.0  # a model process's time to exit after SIGTERM, and again after SIGKILL
_POLL_SECONDS = 1.0  # how often a waiting request looks whether the runner was closed


def make_backend(settings: ModelSettings) -> Backend:
    """The back-end the settings name (imported here: it runs in the model process)."""
    if settings.kind == "nnunet":
        from pipeline.model.nnunet import NnUNetBackend

        return NnUNetBackend(settings)
    from pipeline.model.totalseg import TotalSegBackend

    return TotalSegBackend(settings)


class ModelRunner:
    """A warm model process for one ``ModelSettings``; one request at a time."""

    def __init__(self, settings: ModelSettings, *, what: str | None = None) -> None:
        self.settings = settings
        self.what = what or ("nnU-Net" if settings.kind == "nnunet" else "TotalSegmentator")
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._closed = False
        self._loads_before = 0  # loads of processes that ended
        self._loads_now = 0
        self._in_flight: tuple[float, float] | None = None  # (monotonic start, deadline seconds) of the request
        self._left_behind: list[multiprocessing.process.BaseProcess] = []  # outlived SIGKILL
        self.starts = 0

    def describe(self) -> str:
        return f"{self.what} (warm runner)"

    @property
    def loads(self) -> int:
        """Model loads over the runner's life, restarts included."""
        return self._loads_before + self._loads_now

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def __enter__(self) -> "ModelRunner":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the model process now (otherwise the first request starts it)."""
        with self._lock:
            self._ensure_started()

    def run(self, image: nib.Nifti1Image, *, timeout: float | None = None) -> ModelReply:
        """Segment ``image`` within ``timeout`` seconds (``settings.timeout_seconds``);
        restarts a dead runner and tries once more within the same deadline."""
        payload = _image_payload(image)
        limit = self.settings.timeout_seconds if timeout is None else timeout
        with self._lock:
            self._in_flight = (time.monotonic(), limit)
            try:
                return self._run(payload, limit)
            finally:
                self._in_flight = None

    def overdue(self, margin: float) -> str | None:
        """What is stuck (for the node's ``/healthz``): the request in flight once it is
        more than ``margin`` seconds past its deadline (its process is not stopping),
        and every model process that outlived SIGKILL; None when nothing is."""
        problems = []
        in_flight = self._in_flight
        if in_flight is not None:
            age = time.monotonic() - in_flight[0]
            if age > in_flight[1] + margin:
                pid = self._process.pid if self._process is not None else None
                problems.append(f"{self.what}: a run has taken {age:.0f} s, past its deadline of {in_flight[1]:g} s"
                                f" (timeout_seconds), model process {pid}")
        problems += [f"{self.what}: model process {process.pid} did not exit after SIGKILL"
                     for process in self._left_behind if process.is_alive()]
        return "; ".join(problems) or None

    def _run(self, payload: tuple[bytes, memoryview], limit: float) -> ModelReply:
        deadline = time.monotonic() + limit
        for attempt in (1, 2):
            self._ensure_started()
            try:
                self._send(payload)
                if not self._answered_by(deadline):
                    self._stop_hung()
                    raise ModelTimeoutError(f"the model did not answer within {limit:g} s")
                status, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                if self._closed:
                    raise RunnerStopped(f"{self.what}: the model process was stopped") from exc
                code = self._reap()
                if attempt == 2:
                    raise SegmentationError(
                        f"{self.what}: the model process died twice on this series (exit code {code});"
                        " not tried again"
                    ) from exc
                log.warning("%s: the model process died (exit code %s); starting it again", self.what, code)
                continue
            if status == "ok":
                self._loads_now = value.report.loads
                return value
            kind, message = value
            raise error_of_kind(kind, message)
        raise AssertionError("unreachable")

    def segment_nifti(self, image: nib.Nifti1Image) -> nib.Nifti1Image:
        """Only the label image of ``run``."""
        return self.run(image).labels

    def close(self, timeout: float = 10.0) -> None:
        """Stop the model process: asked first, then terminated."""
        self._closed = True
        process, conn = self._process, self._conn
        if process is None:
            return
        idle = self._lock.acquire(blocking=False)  # else a request is in flight: terminate it
        if idle:
            try:
                conn.send_bytes(b"")  # the stop request
            except (OSError, ValueError):
                pass
            finally:
                self._lock.release()
            process.join(timeout=min(timeout, 2.0))
        if process.is_alive():
            process.terminate()
            process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(timeout)
        if process.is_alive():
            log.error("%s: the model process (pid %s) did not exit after SIGKILL; left behind", self.what,
                      process.pid)
        conn.close()

    def _send(self, payload: tuple[bytes, memoryview]) -> None:
        """Send the request from a thread of its own: a model process that does not read
        (frozen) would block the sender, and the deadline must still hold."""
        conn = self._conn

        def send() -> None:
            try:
                for part in payload:  # the header, then the voxels
                    conn.send_bytes(part)
            except (OSError, ValueError):
                pass  # the process is gone or was stopped: the wait for the answer reads that

        threading.Thread(target=send, name=f"{self.what} request", daemon=True).start()

    def _answered_by(self, deadline: float) -> bool:
        """Wait for the answer (or the process's end) until ``deadline``; False when
        neither came. Raises ``OSError`` when ``close()`` closed the pipe meanwhile."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._conn.poll(min(left, _POLL_SECONDS)):
                return True
            if self._closed:
                raise OSError("the runner was closed")

    def _stop_hung(self) -> None:
        """Stop a model process that missed its deadline; the next request starts a fresh one."""
        log.error("%s: the model process (pid %s) did not answer in time; stopping it", self.what, self._process.pid)
        self._reap(stop=True)

    def _ensure_started(self) -> None:
        if self._closed:
            raise RunnerStopped(f"{self.what}: the runner is closed")
        if self._process is not None and self._process.is_alive():
            return
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_serve, args=(child_end, self.settings.model_dump(mode="json"), os.getpid()),
            name=f"{self.what} runner", daemon=True,
        )
        process.start()
        child_end.close()  # so that the child's death reads as EOF here
        self._process, self._conn = process, parent_end
        if self.starts:
            log.info("%s: model process started again (pid %s)", self.what, process.pid)
        self.starts += 1

    def _reap(self, *, stop: bool = False) -> int | None:
        """Forget the model process once it has ended (``stop``: SIGTERM it first), SIGKILL
        when it lingers. One that outlives SIGKILL too (stuck in the kernel or a GPU
        driver) is left behind and stays in ``overdue``: no wait here is without an end."""
        process = self._process
        if process is None:
            return None
        if stop:
            process.terminate()
        process.join(_STOP_SECONDS)
        if process.is_alive():
            log.warning("%s: the model process (pid %s) did not end; killing it", self.what, process.pid)
            process.kill()
            process.join(_STOP_SECONDS)
        if process.is_alive():
            log.error("%s: the model process (pid %s) did not exit after SIGKILL; left behind", self.what,
                      process.pid)
            self._left_behind.append(process)
        self._conn.close()
        self._process = self._conn = None
        self._loads_before += self._loads_now
        self._loads_now = 0
        return process.exitcode


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the parent is gone (re-parented), whatever the model is doing."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _image_payload(image: nib.Nifti1Image) -> tuple[bytes, memoryview]:
    """A request as it goes down the pipe: the header (shape, dtype, order, affine) and the
    voxels' own buffer (no copy when the array is contiguous, as ``volume_to_nifti`` makes it)."""
    data = np.asanyarray(image.dataobj)
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    if not (data.flags.c_contiguous or data.flags.f_contiguous):
        data = np.ascontiguousarray(data)
    header = pickle.dumps((data.shape, data.dtype.str, order, np.asarray(image.affine, float)))
    return header, memoryview(data.reshape(-1, order="A")).cast("B")


def _receive_image(conn, header: bytes) -> nib.Nifti1Image:
    """The image whose header came: its voxels read into a writable array of their own."""
    shape, dtype, order, affine = pickle.loads(header)
    buffer = bytearray(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    conn.recv_bytes_into(buffer)
    return nib.Nifti1Image(np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order), affine)


def _build(settings: dict) -> Backend | None:
    """The back-end, built at the process's start so that its imports overlap the node's
    reading; None when it cannot be built yet (the first request builds it again and
    answers with the reason)."""
    try:
        return make_backend(ModelSettings.model_validate(settings))
    except Exception:
        log.debug("the model back-end could not be built at start; the first request tries again", exc_info=True)
        return None


def _serve(conn, settings: dict, parent_pid: int) -> None:
    """The model process: build the back-end, then answer requests until told to stop."""
    _watch_parent(parent_pid)
    backend = _build(settings)
    while True:
        try:
            header = conn.recv_bytes()
            if not header:
                return
            image = _receive_image(conn, header)
        except (EOFError, OSError):
            return
        try:
            if backend is None:
                backend = make_backend(ModelSettings.model_validate(settings))
            conn.send(("ok", backend.run(image)))
        except PipelineError as exc:
            conn.send(("error", (type(exc).__name__, str(exc))))
        except BaseException as exc:  # SystemExit too: TotalSegmentator exits on some errors
            log.exception("the model failed")
            conn.send(("error", ("SegmentationError", f"{type(exc).__name__}: {exc}")))


# --- the cold path: one fresh process per image (comparison and reference only) -----------

ModelChild = Callable[[dict, str, str, str], None]
"""A child entry point: (settings as JSON data, input NIfTI, output NIfTI, error file)."""


def run_model_on_nifti(image: nib.Nifti1Image, child: ModelChild, settings: ModelSettings,
                       what: str) -> nib.Nifti1Image:
    """Run ``child`` in a fresh spawned process on ``image``; the label image it wrote."""
    with tempfile.TemporaryDirectory(prefix="dicom-node-segment-") as tmp:
        source, target, error = Path(tmp) / "image.nii", Path(tmp) / "labels.nii", Path(tmp) / "error.txt"
        nib.save(image, source)
        process = multiprocessing.get_context("spawn").Process(
            target=child, args=(settings.model_dump(mode="json"), str(source), str(target), str(error)), name=what
        )
        process.start()
        process.join()
        if process.exitcode != 0 or not target.exists():
            reason = error.read_text().strip() if error.exists() else f"exit code {process.exitcode}"
            raise SegmentationError(f"{what} failed: {reason}")
        labels = nib.load(target)
        data = np.array(np.asanyarray(labels.dataobj))  # read into memory before the folder goes
        return nib.Nifti1Image(data, labels.affine, labels.header)
