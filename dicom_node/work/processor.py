"""The processor: processes jobs and sends their results, recording every step.

``Processor.process(job)`` runs the pipeline over the instances a claimed job covers,
saves the result objects the destinations ask for into the spool and puts one outbox
row per (destination, object) (state ``sending``); ``Processor.send(item)`` makes one send
attempt of one outbox row, by DIMSE C-STORE or DICOMweb STOW-RS. They run on their own
threads (``dicom_node.work.queue``), so a due send never waits behind a segmentation;
``run(job)`` does both in turn. Each is a job boundary: whatever goes wrong inside one
job ends that job (or that send) with a reason naming the cause, and never escapes to
the loop that runs the next job.

* A model stopped because the node is stopping (``RunnerStopped``) hands the job back:
  it stays ``processing`` and the next start runs it again.

* A pipeline error fails the job with its reason; the received series is never touched.
  A model that did not answer within its ``timeout_seconds`` (``ModelTimeoutError``) is
  tried once more first, so that a hung model frees the processing slot and costs one job.
* A result that cannot be saved (a full disk, an unwritable results folder) fails the job.
* A send the destination refuses permanently (``SendError.permanent``) fails that
  outbox row at once; a transient failure is retried with exponential back-off up to
  ``send.max_attempts``, then the row has failed. The job is ``sent`` when every row
  is, ``failed`` when none is pending and one failed; its files stay on disk for
  ``dicom-node retry [--destination NAME]``. A warning status is a success, recorded
  in the reason.
* The rows of a destination with ``review: required`` are written ``held``: they wait
  for a reviewer (``dicom_node.work.review``) while the others send; a job with only held
  rows left is ``review``, and ``process``/``send`` return that state through ``audit_end``
  (where the notifier hears of it).
* A job superseded while it ran (its series grew, see ``dicom_node.store.state``) keeps its
  state and its result is never sent. A SEG that replaces one already sent says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.audit import Audit
from dicom_node.config import Config, Destination
from dicom_node.errors import SendError, SendFailure
from dicom_node.metrics import Metrics
from dicom_node.notify import Notifier
from dicom_node.receive.completion import incompleteness
from dicom_node.send.senders import sender_for
from dicom_node.send.status import SendOutcome
from dicom_node.store.spool import Spool
from dicom_node.store.state import TERMINAL_STATES, Job, JobState, JobUpdate, OutboxItem, OutboxState, StateStore
from dicom_node.work.masks import job_patient_mask
from dicom_node.work.plan import Plan, plan_series, requests_for
from pipeline.errors import ModelTimeoutError, PipelineError
from pipeline.masking import PatientMask
from pipeline.model.segment import Segmenter
from pipeline.model.types import RunnerStopped
from pipeline.outputs.encode import SaveInstance
from pipeline.outputs.options import OutputRequest
from pipeline.process import Outcome, SegResult, SeriesHeaders, process_series, read_series

__all__ = ["Processor", "ModelRun", "retry_delay"]

log = logging.getLogger(__name__)

_MAX_RETRY_DELAY = 3600.0
# the outbox rows a notice names as its destinations: those that failed, wait for review, were sent
_NOTICE_ROWS = {JobState.FAILED: OutboxState.FAILED, JobState.REVIEW: OutboxState.HELD, JobState.SENT: OutboxState.SENT}
_MAX_RECORD_DELAY = 30.0


@dataclass(frozen=True)
class ModelRun:
    """What one model preset did with a job's series: its result, or why there is none."""

    preset: str
    text: str  # the result's reason, the policy's reason for skipping, or the error
    result: SegResult | None = None
    failed: bool = False

    @property
    def line(self) -> str:
        return f"{self.preset}: {'failed: ' if self.failed else ''}{self.text}"

    @property
    def timing(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.result.timing.items()) if self.result else ""

    @property
    def produced(self) -> bool:
        return self.result is not None and self.result.outcome is Outcome.SEG and bool(self.result.objects)


def retry_delay(attempts: int, base: float) -> float:
    """Seconds before the next send attempt after ``attempts`` failures (capped)."""
    return min(base * 2 ** max(attempts - 1, 0), _MAX_RETRY_DELAY)


class Processor:
    def __init__(
        self, config: Config, state: StateStore, spool: Spool, segmenters: Segmenter | Mapping[str, Segmenter],
        metrics: Metrics, audit: Audit | None = None, notifier: Notifier | None = None,
    ) -> None:
        """``segmenters``: one per model preset, by name (one segmenter: the same for every preset)."""
        self.metrics = metrics
        self.audit = audit or Audit.off()
        self.notifier = notifier or Notifier.off()
        self.config = config
        self.state = state
        self.spool = spool
        if not isinstance(segmenters, Mapping):
            segmenters = {preset.name: segmenters for preset in config.models}
        self.segmenters = dict(segmenters)
        self.stopping = threading.Event()  # set when the node stops: waiting for the state store ends
        self._masks: dict[int, PatientMask] = {}  # the patient mask of each job in hand, by job id

    def run(self, job: Job) -> JobState:
        """Advance one claimed job as far as it can go now (each due send attempted
        once); return its new state."""
        state = self.process(job) if job.state is JobState.PROCESSING else job.state
        for item in self.state.outbox(job.id):
            if state is JobState.SENDING and item.state is OutboxState.PENDING and item.next_attempt_at <= time.time():
                state = self.send(item)
        return state

    def process(self, job: Job) -> JobState:
        """Run the pipeline for a ``processing`` job; its new state. Every text it records
        or logs about the job goes through the patient mask of the job's series."""
        self._masks[job.id] = job_patient_mask(self.state, job)
        try:
            return self.audit_end(job.id, self._process(job))
        except RunnerStopped:
            log.info("job %d: handed back (the node is stopping); it runs again at the next start", job.id)
            return JobState.PROCESSING
        except Exception as exc:  # the job boundary: one job fails, the processor goes on
            return self.audit_end(job.id, self._unexpected(job, exc))
        finally:
            self._masks.pop(job.id, None)

    def _mask(self, job: Job) -> PatientMask:
        return self._masks.get(job.id, PatientMask())

    def _masked(self, job: Job, update: JobUpdate) -> JobUpdate:
        """The texts of ``update`` through the job's patient mask."""
        mask = self._mask(job)
        return dataclasses.replace(update, reason=mask(update.reason), routing=mask(update.routing),
                                   model_run=mask(update.model_run), model_outcomes=mask(update.model_outcomes),
                                   last_error=mask(update.last_error))

    def send(self, item: OutboxItem) -> JobState:
        """One send attempt of an outbox row; its job's new state."""
        try:
            return self.audit_end(item.job_id, self._send(item))
        except sqlite3.Error:
            raise  # the state store failed, not the send: the send loop backs off
        except Exception as exc:  # the send boundary: this row fails, the sender goes on
            log.exception("job %d: unexpected error sending %s to %s", item.job_id, item.object, item.destination)
            return self.audit_end(item.job_id, self._record_send(
                item, ok=False, error=f"internal error: {type(exc).__name__}: {exc}"))

    def audit_end(self, job_id: int, state: JobState) -> JobState:
        """``state``, after the audit event of a job that has reached its outcome and the
        webhook notice of one that failed, waits for review or was sent (also called by
        the node for a series that completion failed as not whole). The reason both carry
        goes through the job's patient mask once more: a destination's error text, or a
        refusal's, was recorded as it came."""
        audited = self.audit.enabled and state in TERMINAL_STATES
        notified = self.notifier.wants(state)
        if not audited and not notified:
            return state
        try:
            job = self.state.job(job_id)
            if job is None:
                return state
            rows = self.state.outbox(job_id) if notified else []
            mask = self._masks.get(job_id) or (job_patient_mask(self.state, job) if job.reason else PatientMask())
        except sqlite3.Error as exc:
            log.error("job %d: its end is neither audited nor notified: the state store cannot be read (%s)",
                      job_id, exc)
            return state
        reason = mask(job.reason)
        study, series = job.series.study_instance_uid, job.series.series_instance_uid
        if audited:
            self.audit.record_job_ended(job_id=job.id, state=job.state.value, failed=job.state is JobState.FAILED,
                                        study=study, series=series, reason=reason, reprocess_of=job.reprocess_of)
        if notified:
            kind = _NOTICE_ROWS[state]
            self.notifier.notify(job_id=job.id, state=state, reason=reason, study=study, series=series,
                                 destinations=[row.destination for row in rows if row.state is kind])
        return state

    def _audit_send(self, item: OutboxItem, files: list[Path], destination: Destination, *, ok: bool,
                    final: bool, error: str | None = None, warning: str | None = None) -> None:
        """The audit event of one send attempt: the object's UIDs (its files are named by
        SOP instance UID) and where it went."""
        if not self.audit.enabled:
            return
        study = series = None
        try:
            job = self.state.job(item.job_id)
            study = job.series.study_instance_uid if job is not None else None
            if files:
                series = str(pydicom.dcmread(files[0], stop_before_pixels=True,
                                             specific_tags=["SeriesInstanceUID"]).get("SeriesInstanceUID", "")) or None
        except (sqlite3.Error, OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("job %d: the audit event of its %s send lacks UIDs (%s)", item.job_id, item.object, exc)
        self.audit.record_sent(job_id=item.job_id, destination=item.destination, peer=destination.peer,
                               object_key=item.object, study=study, series=series, sops=[f.stem for f in files],
                               ok=ok, final=final, error=error, warning=warning)

    def _record_send(self, item: OutboxItem, **outcome) -> JobState:
        """Record an attempt's outcome; when the state store fails, try again with back-off
        rather than send again: the destination already has the object once. Gives up
        (raising) only when the node stops; the next start then sends it once more, under
        the same UIDs, which the destination takes as the same object."""
        delay = 0.5
        while True:
            try:
                return self.state.record_send(item.id, **outcome)
            except sqlite3.Error as exc:
                if self.stopping.is_set():
                    raise
                log.error("job %d: cannot record the send of %s to %s (%s); trying again in %.1fs", item.job_id,
                          item.object, item.destination, exc, delay)
                if self.stopping.wait(delay):
                    raise
                delay = min(delay * 2, _MAX_RECORD_DELAY)

    def _unexpected(self, job: Job, exc: Exception) -> JobState:
        log.exception("job %d: unexpected error", job.id)
        reason = f"internal error: {type(exc).__name__}: {exc}"
        self.metrics.series_outcomes.labels("failed").inc()
        self.state.update_job(job.id, JobState.FAILED, self._masked(job, JobUpdate(reason=reason)))
        return JobState.FAILED

    def _fail(self, job: Job, reason: str, recorded: JobUpdate = JobUpdate(), *,
              expect: JobState = JobState.PROCESSING) -> JobState:
        update = self._masked(job, dataclasses.replace(recorded, reason=reason))
        log.warning("job %d: failed: %s", job.id, update.reason)
        self.metrics.series_outcomes.labels("failed").inc()
        if not self.state.update_job(job.id, JobState.FAILED, update, expect=expect):
            return self._superseded(job)
        return JobState.FAILED

    def _superseded(self, job: Job) -> JobState:
        log.info("job %d: superseded by a newer job of its series while it ran; its result is not sent", job.id)
        return JobState.SUPERSEDED

    def _process(self, job: Job) -> JobState:
        series_uid = job.series.series_instance_uid
        paths = self.state.instance_paths(series_uid, upto_seq=job.upto_seq)
        log.info("job %d: processing series %s (%d instances)", job.id, series_uid, len(paths))
        try:
            headers = read_series(paths, self.config.pipeline)
        except PipelineError as exc:
            return self._fail(job, str(exc))
        plan = plan_series(self.config, headers, job.series.calling_ae_title)
        recorded = JobUpdate(routing=plan.explanation, sequence_class=headers.classification.sequence_class.value)
        if plan.skip_reason is not None:
            return self._end_without_result(job, JobState.SKIPPED, Outcome.SKIPPED, plan.skip_reason, recorded)
        missing = incompleteness(self.state, series_uid)
        if missing is not None and not job.allow_partial:
            return self._fail(job, f"the series is not whole: {missing}; not processed (`dicom-node retry"
                                   f" --reprocess --allow-partial {job.id}` processes what there is)", recorded)

        saver = _ResultSaver(self.spool, job.id, self.config.result_key)  # each object saved as it is made
        runs = self._run_models(job, paths, headers, plan, partial=missing, saver=saver)
        several = len(runs) > 1
        # one model: its reason as it says it; several: a line each, named
        reason = "; ".join(run.line for run in runs) if several else runs[0].text
        recorded = dataclasses.replace(recorded, model_outcomes="\n".join(run.line for run in runs))
        reports = [(run.preset, report) for run in runs for report in [self._model_report(run)] if report]
        if reports:
            recorded = dataclasses.replace(
                recorded, model_run="; ".join(f"{name}: {report}" if several else report for name, report in reports))
        results = [run for run in runs if run.result is not None]
        if results and results[0].result.preprocessing is not None:  # type: ignore[union-attr]
            recorded = dataclasses.replace(recorded, preprocessing=results[0].result.preprocessing.value)  # type: ignore[union-attr]
        produced = [run for run in results if run.produced]
        if saver.error is not None:
            return self._fail(job, f"cannot save the results into the spool ({self.spool.results}): {saver.error}",
                              recorded)
        if not produced:
            if any(run.failed for run in runs):
                return self._fail(job, reason, recorded)
            outcome = results[0].result.outcome  # type: ignore[union-attr]
            state = JobState.SKIPPED if outcome is Outcome.SKIPPED else JobState.NO_RESULT
            return self._end_without_result(job, state, outcome, reason, recorded)
        if self.state.job(job.id).state is not JobState.PROCESSING:  # type: ignore[union-attr]
            return self._superseded(job)
        key = self.config.result_key
        series = {key(run.preset, obj): obj.series_instance_uid
                  for run in produced for obj in run.result.objects}  # type: ignore[union-attr]
        saved = saver.saved(series)  # a failed model's objects, saved before it failed, are not sent
        items = [(destination.name, name, self.spool.result_folder(job.id, name))
                 for destination in plan.destinations for name in plan.result_keys[destination.name] if name in saved]
        # the job's SEG, which a later job of a grown series replaces: the first preset's
        first = produced[0]
        seg = (first.result.seg_series_uid
               if first.result is not None and first.preset == plan.running[0].preset else None)
        held = {destination.name for destination in plan.destinations if destination.review == "required"}
        if not self.state.start_sending(
            job.id, items, object_series=series, held=held,
            update=self._masked(job, dataclasses.replace(recorded, reason=reason,
                                                         result_path=next(iter(saved.values()))[0], seg_series_uid=seg)),
        ):
            return self._superseded(job)
        self.metrics.series_outcomes.labels(Outcome.SEG.value).inc()
        made = ", ".join(f"{name} ({len(files)})" for name, files in saved.items())
        timing = "; ".join(f"{run.preset}: " * several + run.timing for run in results)
        log.info("job %d: made %s with %s (%s)", job.id, made, self._mask(job)(reason), timing)
        if held.intersection(destination for destination, _, _ in items):
            now = self.state.job(job.id)  # ``review`` when every row is held (returned through ``audit_end``)
            log.info("job %d: its objects for %s wait for a reviewer", job.id, ", ".join(sorted(held)))
            return now.state if now is not None else JobState.SENDING
        return JobState.SENDING

    def _run_models(self, job: Job, paths: list[Path], headers: SeriesHeaders, plan: Plan, *,
                    partial: str | None = None, saver: _ResultSaver | None = None) -> list[ModelRun]:
        """Run each preset the plan names, in turn. A model that fails is recorded and the
        next one runs. ``partial``: what the series lacks, for a job processed on purpose
        although it is not whole (its objects say so)."""
        requests = requests_for(plan)
        runs: list[ModelRun] = []
        for model in plan.models:
            if not model.runs:
                runs.append(ModelRun(model.preset, model.reason))
                continue
            try:
                result = self._retry_after_timeout(job, model.preset, functools.partial(
                    process_series,
                    paths, self.config.pipeline_for(model.preset), self.segmenters[model.preset], requests,
                    supersedes=self._superseded_seg(job, model.preset, requests, first=model is plan.running[0]),
                    series_headers=headers, partial=partial, **self.config.preset_marks(model.preset),
                    max_series_voxels=self.config.storage.max_series_voxels,
                    save=None if saver is None else saver.for_preset(model.preset),
                ))
            except PipelineError as exc:
                log.warning("job %d: model %s failed: %s", job.id, model.preset, self._mask(job)(str(exc)))
                runs.append(ModelRun(model.preset, str(exc), failed=True))
                continue
            except RunnerStopped:
                raise
            except Exception as exc:  # one model's unexpected error: the others still run
                log.exception("job %d: model %s: unexpected error", job.id, model.preset)
                runs.append(ModelRun(model.preset, f"internal error: {type(exc).__name__}: {exc}", failed=True))
                continue
            for stage, seconds in result.seconds.items():
                self.metrics.stage_seconds.labels(stage).observe(seconds)
            runs.append(ModelRun(model.preset, result.reason, result))
        return runs

    def _retry_after_timeout(self, job: Job, preset: str, run: Callable[[], SegResult]) -> SegResult:
        """A model past its deadline gets one more try (on a fresh model process): a hang is
        more often the process's than the series'. A second one fails the model's run."""
        try:
            return run()
        except ModelTimeoutError as exc:
            log.warning("job %d: model %s: %s; trying once more", job.id, preset, exc)
        try:
            return run()
        except ModelTimeoutError as exc:
            raise ModelTimeoutError(f"{exc} (tried twice)") from exc

    def _superseded_seg(self, job: Job, preset: str, requests: list, *, first: bool) -> str | None:
        """The SEG series of this preset that an earlier job of the series sent, which the
        new SEG replaces (the job's first preset: also a SEG of an earlier release)."""
        seg = next((request for request in requests if request.kind == "seg"), None)
        if seg is None:
            return None
        series_uid = job.series.series_instance_uid
        return (self.state.sent_object_series(series_uid, job.id, self.config.result_key(preset, seg))
                or (self.state.sent_seg_series(series_uid, before_job=job.id) if first else None))

    def _end_without_result(self, job: Job, state: JobState, outcome: Outcome, reason: str,
                            recorded: JobUpdate) -> JobState:
        update = self._masked(job, dataclasses.replace(recorded, reason=reason))
        if not self.state.update_job(job.id, state, update, expect=JobState.PROCESSING):
            return self._superseded(job)
        self.metrics.series_outcomes.labels(outcome.value).inc()
        log.info("job %d: %s: %s", job.id, state.value, update.reason)
        return state

    def _model_report(self, run: ModelRun) -> str | None:
        """The model process's report of the preset's run (carried by its result), into the
        metrics and a line (None when its model did not run)."""
        if run.result is None or "segment" not in run.result.seconds:
            return None
        report = run.result.model_report
        if report is None:
            return None
        self.metrics.model_runs.labels(report.worker, report.device).inc()
        for part, seconds in (("load", report.load_seconds), ("forward", report.forward_seconds),
                              ("overhead", report.overhead_seconds)):
            self.metrics.model_seconds.labels(part).observe(seconds)
        # every part of the preset's run, so that they add up to its time (not only the model process's)
        timing = run.result.timing
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timing.items())
        return (f"{report.worker} on {report.device}: {parts} (total {sum(timing.values()):.1f}s;"
                f" model loads: {report.loads})")

    def _send(self, item: OutboxItem) -> JobState:
        settings = self.config.send
        attempts = item.attempts + 1
        try:
            destination = self.config.destination(item.destination)
        except KeyError:
            return self._record_send(item, ok=False, error=(
                f"destination {item.destination!r} is no longer in the configuration; not sent"))
        files = sorted(item.path.glob("*.dcm"))
        self.metrics.send_attempts.labels(item.destination).inc()
        try:
            if not files:
                raise SendError(f"the {item.object} files are gone from {item.path}", peer=destination.peer,
                                permanent=True)
            outcome = self._deliver(files, destination)
        except (SendError, OSError) as exc:
            kind = exc.kind if isinstance(exc, SendError) else SendFailure.LOCAL_ERROR
            self.metrics.send_failures.labels(item.destination, kind.value).inc()
            permanent = isinstance(exc, SendError) and exc.permanent
            what = f"job {item.job_id}: {item.object} to {item.destination}"
            if permanent or attempts >= settings.max_attempts:
                error = (f"send refused, not retried: {exc}" if permanent
                         else f"send failed after {attempts} attempt(s): {exc}")
                log.error("%s: %s", what, error)
                self._audit_send(item, files, destination, ok=False, final=True, error=error)
                return self._record_send(item, ok=False, error=error)
            delay = retry_delay(attempts, settings.retry_delay_seconds)
            log.warning("%s: send attempt %d failed (%s); next in %.0fs", what, attempts, exc, delay)
            error = f"send attempt {attempts} failed: {exc}"
            self._audit_send(item, files, destination, ok=False, final=False, error=error)
            return self._record_send(item, ok=False, error=error, retry_at=time.time() + delay)
        self._audit_send(item, files, destination, ok=True, final=True, warning=outcome.warning)
        state = self._record_send(item, ok=True, warning=outcome.warning)
        log.info("job %d: %s sent to %s%s", item.job_id, item.object, item.destination,
                 "" if outcome.warning is None else f" with warning {outcome.warning}")
        return state

    def _deliver(self, files: list, destination: Destination) -> SendOutcome:
        send = sender_for(destination, calling_ae_title=self.config.node.ae_title,
                          timeout=self.config.send.timeout_seconds)
        return send(files)


class _ResultSaver:
    """Writes each result instance into the spool as the pipeline makes it, so that one
    object is in memory at a time, never every preset's objects until all ran; keeps the
    files by object name, in the order they were made, and the first error (the job then
    fails with it)."""

    def __init__(self, spool: Spool, job_id: int, name: Callable[[str, OutputRequest], str]) -> None:
        self.spool = spool
        self.job_id = job_id
        self.name = name
        self.files: dict[str, dict[Path, None]] = {}  # ordered sets: a model run again rewrites the same files
        self.error: OSError | None = None
        self._cleared = False

    def for_preset(self, preset: str) -> SaveInstance:
        """The ``save`` of one preset's ``process_series``."""
        return lambda request, dataset: self._save(self.name(preset, request), dataset)

    def _save(self, name: str, dataset: pydicom.Dataset) -> None:
        try:
            if not self._cleared:
                self.spool.clear_results(self.job_id)
                self._cleared = True
            path = self.spool.store_result(self.job_id, name, str(dataset.SOPInstanceUID), _encode(dataset))
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.files.setdefault(name, {})[path] = None

    def saved(self, names: Mapping[str, object]) -> dict[str, list[Path]]:
        """The files of the objects ``names``, in the order they were made."""
        return {name: list(files) for name, files in self.files.items() if name in names}


def _encode(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
