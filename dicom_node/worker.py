"""The worker: runs one job at a time, from series to sent SEG, recording every step.

``Worker.run(job)`` is the unit of work: for a ``received`` job it runs the pipeline,
saves the SEG into the spool (state ``sending``), then sends it; for a ``sending`` job it
tries the send again. A failed send is retried with exponential back-off up to
``send.max_attempts``; then the job is ``failed`` with the last error and its SEG stays
on disk for ``dicom-node retry``. A pipeline error fails the job with its reason; the
received series is never touched.
"""

from __future__ import annotations

import logging
import time

from dicom_node.config import Config
from dicom_node.errors import SendError
from dicom_node.metrics import Metrics
from dicom_node.scu import send_file
from dicom_node.spool import Spool
from dicom_node.state import Job, JobState, StateStore
from pipeline.errors import PipelineError
from pipeline.run import Outcome, process_series
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
        """Advance one claimed job as far as it can go now; return its new state."""
        if job.state is JobState.PROCESSING:
            state = self._process(job)
            if state is not JobState.SENDING:
                return state
            job = self.state.job(job.id)  # type: ignore[assignment]
        if job.state is JobState.SENDING:
            return self._send(job)
        return job.state

    def _process(self, job: Job) -> JobState:
        series_uid = job.series.series_instance_uid
        paths = self.state.instance_paths(series_uid)
        log.info("job %d: processing series %s (%d instances)", job.id, series_uid, len(paths))
        try:
            result = process_series(paths, self.config.pipeline, self.segmenter, self.config.destination.seg_options)
        except PipelineError as exc:
            log.warning("job %d: failed: %s", job.id, exc)
            self.metrics.series_outcomes.labels("failed").inc()
            self.state.update_job(job.id, JobState.FAILED, reason=str(exc))
            return JobState.FAILED
        except Exception as exc:  # an unexpected bug must not kill the worker
            log.exception("job %d: unexpected error", job.id)
            self.state.update_job(job.id, JobState.FAILED, reason=f"internal error: {type(exc).__name__}: {exc}")
            return JobState.FAILED
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
        for stage, seconds in result.seconds.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.series_outcomes.labels(result.outcome.value).inc()
        recorded = {
            "reason": result.reason,
            "sequence_class": result.classification.sequence_class.value,
            "preprocessing": result.preprocessing.value if result.preprocessing else None,
        }
        if result.outcome is not Outcome.SEG or result.seg is None:
            state = JobState.SKIPPED if result.outcome is Outcome.SKIPPED else JobState.NO_RESULT
            log.info("job %d: %s: %s (%s)", job.id, state.value, result.reason, timing)
            self.state.update_job(job.id, state, **recorded)
            return state
        encoded = _encode(result.seg)
        path = self.spool.store_result(job.id, str(result.seg.SOPInstanceUID), encoded)
        log.info("job %d: SEG %s with %s (%s)", job.id, result.seg.SOPInstanceUID, result.reason, timing)
        self.state.update_job(job.id, JobState.SENDING, result_path=path, next_attempt_at=0, **recorded)
        return JobState.SENDING

    def _send(self, job: Job) -> JobState:
        assert job.result_path is not None
        settings = self.config.send
        self.metrics.send_attempts.inc()
        try:
            send_file(
                job.result_path,
                self.config.destination,
                calling_ae_title=self.config.node.ae_title,
                timeout=settings.timeout_seconds,
            )
        except (SendError, OSError) as exc:
            self.metrics.send_failures.inc()
            attempts = job.attempts + 1
            if attempts >= settings.max_attempts:
                reason = f"send failed after {attempts} attempt(s): {exc}"
                log.error("job %d: %s", job.id, reason)
                self.state.update_job(job.id, JobState.FAILED, reason=reason, attempts=attempts)
                return JobState.FAILED
            delay = retry_delay(attempts, settings.retry_delay_seconds)
            log.warning("job %d: send attempt %d failed (%s); next in %.0fs", job.id, attempts, exc, delay)
            self.state.update_job(
                job.id,
                JobState.SENDING,
                reason=f"send attempt {attempts} failed: {exc}",
                attempts=attempts,
                next_attempt_at=time.time() + delay,
            )
            return JobState.SENDING
        self.state.update_job(job.id, JobState.SENT, reason=job.reason, attempts=job.attempts + 1)
        log.info("job %d: sent", job.id)
        return JobState.SENT


def _encode(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
