"""Review before sending: a reviewer's approval or rejection of a job's held objects, and
their expiry.

A destination with ``review: required`` gets its objects only after a person approved
them (``dicom_node.store.state`` holds them, ``StateStore.approve``/``reject``/
``expire_reviews`` change them). ``Reviews`` is what the status page and the
``dicom-node review`` command share around those: the reviewer's reason through the
patient mask of the job's series (it is kept in the job and shown on the page), one
audit event per decision, the send threads woken on approval, and every job that
reaches its outcome (``rejected``, ``expired``, or ``failed`` for a send of it that
failed) handed to ``ended`` (``Processor.audit_end`` in the node), as every other
outcome is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from dicom_node.audit import Audit
from dicom_node.store.state import Job, JobState, ReviewDecision, StateStore
from dicom_node.work.masks import job_patient_mask
from pipeline.masking import cut

__all__ = ["Reviews", "ReviewRefused"]

log = logging.getLogger(__name__)

_MAX_REASON = 1000  # characters of a rejection's reason kept


class ReviewRefused(ValueError):
    """A decision that cannot be taken: no such job (``missing``), or nothing of it is
    waiting for review, or a rejection without a reason."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class Reviews:
    """Approve, reject and expire held objects over the state store."""

    def __init__(self, state: StateStore, *, audit: Audit | None = None,
                 ended: Callable[[int, JobState], JobState] | None = None,
                 wake: Callable[[int], None] | None = None) -> None:
        """``ended``: told of every move a decision makes (the node's
        ``Processor.audit_end``); ``wake``: told of an approved job (the queue's
        ``submit``, so that its sends start now rather than at the next poll)."""
        self.state = state
        self.audit = audit or Audit.off()
        self.ended = ended or (lambda job_id, job_state: job_state)
        self.wake = wake or (lambda job_id: None)

    def approve(self, job_id: int, who: Mapping[str, Any]) -> JobState:
        """Send the job's held objects; its new state. ``ReviewRefused`` when it has none."""
        job = self._job(job_id)
        try:
            state = self.state.approve(job_id, _reviewer(who))
        except (KeyError, ValueError) as exc:
            raise ReviewRefused(str(exc.args[0] if exc.args else exc), missing=isinstance(exc, KeyError)) from exc
        self._record(job, ReviewDecision.APPROVED, who, None)
        log.info("job %d: approved by %s; its held objects are sent", job_id, _reviewer(who))
        self.wake(job_id)
        return self.ended(job_id, state)

    def reject(self, job_id: int, reason: str, who: Mapping[str, Any]) -> JobState:
        """Never send the job's held objects, recording ``reason`` (masked); its new state."""
        job = self._job(job_id)
        masked = cut(job_patient_mask(self.state, job)(" ".join((reason or "").split())), _MAX_REASON) or ""
        try:
            state = self.state.reject(job_id, masked, _reviewer(who))
        except (KeyError, ValueError) as exc:
            raise ReviewRefused(str(exc.args[0] if exc.args else exc), missing=isinstance(exc, KeyError)) from exc
        self._record(job, ReviewDecision.REJECTED, who, masked)
        log.info("job %d: rejected by %s: %s", job_id, _reviewer(who), masked)
        return self.ended(job_id, state)

    def expire(self, days: float) -> list[int]:
        """Held objects unreviewed for ``days`` are never sent (``review.expire_days``); the jobs changed."""
        changed = self.state.expire_reviews(days)
        for job_id, state in changed:
            job = self.state.job(job_id)
            if job is not None:
                self._record(job, ReviewDecision.EXPIRED, {"role": "node"}, f"not reviewed within {days:g} day(s)")
            log.warning("job %d: its held objects were not reviewed within %g day(s); they are not sent",
                        job_id, days)
            self.ended(job_id, state)
        return [job_id for job_id, _ in changed]

    def _job(self, job_id: int) -> Job:
        job = self.state.job(job_id)
        if job is None:
            raise ReviewRefused(f"no job {job_id}", missing=True)
        return job

    def _record(self, job: Job, decision: ReviewDecision, who: Mapping[str, Any], reason: str | None) -> None:
        self.audit.record_review(who=who, decision=decision.value, ok=True, job_id=job.id,
                                 study=job.series.study_instance_uid, series=job.series.series_instance_uid,
                                 reason=reason)


def _reviewer(who: Mapping[str, Any]) -> str:
    """Who decided, in one line for the job's review record: the page's client or the operator."""
    return ", ".join(f"{key} {value}" for key, value in who.items() if value) or "unknown"
