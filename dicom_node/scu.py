"""The storage SCU: C-STORE a produced SEG to the configured destination.

Any failure (no association, rejection, abort, a failure status) raises ``SendError``
with a reason; the caller keeps the job queued for a retry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.status import code_to_category

from dicom_node.config import Destination
from dicom_node.errors import SendError
from dicom_node.tls import client_context

__all__ = ["send_file"]

log = logging.getLogger(__name__)


def send_file(path: Path, destination: Destination, *, calling_ae_title: str, timeout: float = 30.0) -> None:
    """C-STORE the Part 10 file at ``path``; raise ``SendError`` unless it succeeded."""
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    transfer_syntax = dataset.file_meta.TransferSyntaxUID
    ae.add_requested_context(dataset.SOPClassUID, [transfer_syntax])
    tls_args = (client_context(destination.tls), None) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SendError(
            f"association to {destination.ae_title}@{destination.host}:{destination.port} {reason}"
        )
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise SendError(f"no C-STORE response from {destination.ae_title} (timeout or abort)")
    code = int(status.Status)
    if code_to_category(code) not in ("Success", "Warning"):
        raise SendError(f"{destination.ae_title} answered C-STORE with status 0x{code:04X}")
    log.info("sent SEG %s to %s (status 0x%04X)", dataset.SOPInstanceUID, destination.ae_title, code)
