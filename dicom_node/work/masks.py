"""The patient mask of a job's series, read from one of its instances: what the processor
puts through it (the job record, its log lines, the audit's and the notices' reasons) and
what a reviewer's typed reason goes through (``work/review``)."""

from __future__ import annotations

import pydicom

from dicom_node.store.state import Job, StateStore
from pipeline.masking import PATIENT_KEYWORDS, PatientMask

__all__ = ["job_patient_mask"]


def job_patient_mask(state: StateStore, job: Job) -> PatientMask:
    """The mask of the patient the job's series names; an empty one when no instance can be
    read (such a job fails on reading its series anyway)."""
    for path in state.instance_paths(job.series.series_instance_uid, upto_seq=job.upto_seq)[:1]:
        try:
            return PatientMask.of(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(PATIENT_KEYWORDS)))
        except Exception:  # an unreadable or vanished file
            return PatientMask()
    return PatientMask()
