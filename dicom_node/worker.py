"""The worker: processes jobs and sends their results, recording every step.

``Worker.process(job)`` runs the pipeline over the instances a claimed job covers,
saves the result objects the destinations ask for into the spool and puts one outbox
row per (destination, object) (state ``sending``); ``Worker.send(item)`` makes one send
attempt of one outbox row, by DIMSE C-STORE or DICOMweb STOW-RS. They run on their own
threads (``dicom_node.handoff``), so a due send never waits behind a segmentation;
``run(job)`` does both in turn. Each is a job boundary: whatever goes wrong inside one
job ends that job (or that send) with a reason naming the cause, and never escapes to
the loop that runs the next job.

* A model stopped because the node is stopping (``RunnerStopped``) hands the job back:
  it stays ``processing`` and the next start runs it again.

* A pipeline error fails the job with its reason; the received series is never touched.
* A result that cannot be saved (a full disk, an unwritable results folder) fails the job.
* A send the destination refuses permanently (``SendError.permanent``) fails that
  outbox row at once; a transient failure is retried with exponential back-off up to
  ``send.max_attempts``, then the row has failed. The job is ``sent`` when every row
  is, ``failed`` when none is pending and one failed; its files stay on disk for
  ``dicom-node retry [--destination NAME]``. A warning status is a success, recorded
  in the reason.
* A job superseded while it ran (its series grew, see ``dicom_node.state``) keeps its
  state and its result is never sent. A SEG that replaces one already sent says so.
"""

from __future__ import annotations

import logging
import time

from dicom_node.config import Config, Destination
from dicom_node.errors import SendError
from dicom_node.metrics import Metrics
from dicom_node.scu import SendOutcome, send_files
from dicom_node.spool import Spool
from dicom_node.state import Job, JobState, OutboxItem, OutboxState, StateStore
from dicom_node.stow import stow_files
from pipeline.errors import PipelineError
from pipeline.run import Outcome, process_series
from pipeline.runner import RunnerStopped
from pipeline.segment import Segmenter

__all__ = ["Worker", "retry_delay"]

log = logging.getLogger(__name__)

_MAX_RETRY_DELAY = 3600.0


def retry_delay(attempts: int, base: float) -> float:
    """Seconds before the next send attempt after ``attempts`` failures (capped)."""
    return min(base * 2 ** max(attempts - 1, 0), _MAX_RETRY_DELAY)


class Worker:
    def __init__(
        self, config: Config, state: StateStore, spool: Spool, segmenter: Segmenter, metrics: Metrics
    ) -> None:
        self.metrics = metrics
        self.config = config
        self.state = state
        self.spool = spool
        self.segmenter = segmenter

    def run(self, job: Job) -> JobState:
        """Advance one claimed job as far as it can go now (each due send attempted
        once); return its new state."""
        state = self.process(job) if job.state is JobState.PROCESSING else job.state
        for item in self.state.outbox(job.id):
            if state is JobState.SENDING and item.state is OutboxState.PENDING and item.next_attempt_at <= time.time():
                state = self.send(item)
        return state

    def process(self, job: Job) -> JobState:
        """Run the pipeline for a ``processing`` job; its new state."""
        try:
            return self._process(job)
        except RunnerStopped:
            log.info("job %d: handed back (the node is stopping); it runs again at the next start", job.id)
            return JobState.PROCESSING
        except Exception as exc:  # the job boundary: one job fails, the worker goes on
            return self._unexpected(job, exc)

    def send(self, item: OutboxItem) -> JobState:
        """One send attempt of an outbox row; its job's new state."""
        try:
            return self._send(item)
        except Exception as exc:  # the send boundary: this row fails, the sender goes on
            log.exception("job %d: unexpected error sending %s to %s", item.job_id, item.object, item.destination)
            return self.state.record_send(item.id, ok=False, error=f"internal error: {type(exc).__name__}: {exc}")

    def _unexpected(self, job: Job, exc: Exception) -> JobState:
        log.exception("job %d: unexpected error", job.id)
        reason = f"internal error: {type(exc).__name__}: {exc}"
        self.metrics.series_outcomes.labels("failed").inc()
        self.state.update_job(job.id, JobState.FAILED, reason=reason)
        return JobState.FAILED

    def _fail(self, job: Job, reason: str, *, expect: JobState = JobState.PROCESSING) -> JobState:
        log.warning("job %d: failed: %s", job.id, reason)
        self.metrics.series_outcomes.labels("failed").inc()
        if not self.state.update_job(job.id, JobState.FAILED, reason=reason, expect=expect):
            return self._superseded(job)
        return JobState.FAILED

    def _superseded(self, job: Job) -> JobState:
        log.info("job %d: superseded by a newer job of its series while it ran; its result is not sent", job.id)
        return JobState.SUPERSEDED

    def _process(self, job: Job) -> JobState:
        series_uid = job.series.series_instance_uid
        paths = self.state.instance_paths(series_uid, upto_seq=job.upto_seq)
        supersedes = self.state.sent_seg_series(series_uid, before_job=job.id)
        log.info("job %d: processing series %s (%d instances)", job.id, series_uid, len(paths))
        try:
            result = process_series(
                paths, self.config.pipeline, self.segmenter, self.config.output_requests,
                supersedes=supersedes,
            )
        except PipelineError as exc:
            return self._fail(job, str(exc))
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
        for stage, seconds in result.seconds.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        recorded = {
            "reason": result.reason,
            "sequence_class": result.classification.sequence_class.value,
            "preprocessing": result.preprocessing.value if result.preprocessing else None,
            "model_run": self._model_report() if "segment" in result.seconds else None,
        }
        if result.outcome is not Outcome.SEG or not result.objects:
            state = JobState.SKIPPED if result.outcome is Outcome.SKIPPED else JobState.NO_RESULT
            if not self.state.update_job(job.id, state, expect=JobState.PROCESSING, **recorded):
                return self._superseded(job)
            self.metrics.series_outcomes.labels(result.outcome.value).inc()
            log.info("job %d: %s: %s (%s)", job.id, state.value, result.reason, timing)
            return state
        if self.state.job(job.id).state is not JobState.PROCESSING:  # type: ignore[union-attr]
            return self._superseded(job)
        try:
            saved = {obj.key: [self.spool.store_result(job.id, obj.key, str(ds.SOPInstanceUID), _encode(ds))
                               for ds in obj.datasets]
                     for obj in result.objects}
        except OSError as exc:
            return self._fail(job, f"cannot save the results into the spool ({self.spool.results}): {exc}")
        items = [(destination.name, request.key, self.spool.result_folder(job.id, request.key))
                 for destination in self.config.destinations for request in destination.requests
                 if request.key in saved]
        seg = result.seg
        first = next(iter(saved.values()))[0]
        if not self.state.start_sending(
            job.id, items, result_path=first, seg_series_uid=None if seg is None else str(seg.SeriesInstanceUID),
            **recorded,
        ):
            return self._superseded(job)
        self.metrics.series_outcomes.labels(result.outcome.value).inc()
        made = ", ".join(f"{obj.key} ({len(obj.datasets)})" for obj in result.objects)
        log.info("job %d: made %s with %s (%s)", job.id, made, result.reason, timing)
        return JobState.SENDING

    def _model_report(self) -> str | None:
        """The model process's report of this thread's last run, into the metrics and a line."""
        report = getattr(self.segmenter, "last_report", None)
        if report is None:
            return None
        self.metrics.model_runs.labels(report.worker, report.device).inc()
        for part, seconds in (("load", report.load_seconds), ("forward", report.forward_seconds),
                              ("overhead", report.overhead_seconds)):
            self.metrics.model_seconds.labels(part).observe(seconds)
        return (f"{report.worker} on {report.device}: load {report.load_seconds:.1f}s, forward"
                f" {report.forward_seconds:.1f}s, overhead {report.overhead_seconds:.1f}s (model loads: {report.loads})")

    def _send(self, item: OutboxItem) -> JobState:
        settings = self.config.send
        attempts = item.attempts + 1
        try:
            destination = self.config.destination(item.destination)
        except KeyError:
            return self.state.record_send(item.id, ok=False, error=(
                f"destination {item.destination!r} is no longer in the configuration; not sent"))
        files = sorted(item.path.glob("*.dcm"))
        self.metrics.send_attempts.labels(item.destination).inc()
        try:
            if not files:
                raise SendError(f"the {item.object} files are gone from {item.path}", peer=destination.peer,
                                permanent=True)
            outcome = self._deliver(files, destination)
        except (SendError, OSError) as exc:
            kind = exc.kind if isinstance(exc, SendError) else "local error"
            self.metrics.send_failures.labels(item.destination, kind).inc()
            permanent = isinstance(exc, SendError) and exc.permanent
            what = f"job {item.job_id}: {item.object} to {item.destination}"
            if permanent or attempts >= settings.max_attempts:
                error = (f"send refused, not retried: {exc}" if permanent
                         else f"send failed after {attempts} attempt(s): {exc}")
                log.error("%s: %s", what, error)
                return self.state.record_send(item.id, ok=False, error=error)
            delay = retry_delay(attempts, settings.retry_delay_seconds)
            log.warning("%s: send attempt %d failed (%s); next in %.0fs", what, attempts, exc, delay)
            return self.state.record_send(item.id, ok=False, error=f"send attempt {attempts} failed: {exc}",
                                          retry_at=time.time() + delay)
        state = self.state.record_send(item.id, ok=True, warning=outcome.warning)
        log.info("job %d: %s sent to %s%s", item.job_id, item.object, item.destination,
                 "" if outcome.warning is None else f" with warning {outcome.warning}")
        return state

    def _deliver(self, files: list, destination: Destination) -> SendOutcome:
        timeout = self.config.send.timeout_seconds
        if destination.protocol == "dicomweb":
            return stow_files(files, destination, timeout=timeout)
        return send_files(files, destination, calling_ae_title=self.config.node.ae_title, timeout=timeout)


def _encode(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
