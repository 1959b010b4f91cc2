"""The storage SCU: C-STORE a produced object (its files) to a DIMSE destination.

``send_files`` sends every file of one object over one association and returns when
the destination took them all (success, or a warning such as 0xB000 coercion of data
elements, which is recorded); ``send_file`` sends one.
Anything else raises ``SendError``, which names the peer, the DICOM status in hex and
its meaning where there is one, and says whether trying again can help:

* permanent (the job fails at once): the destination refuses the SEG's SOP class or
  transfer syntax (presentation context rejected), rejects the association
  permanently, or answers a failure status that a retry cannot change (0xA9xx data
  set does not match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not
  supported, 0x0124 not authorised, ...);
* transient (the job is retried with back-off): no connection, an association rejected
  transiently or aborted, no answer within the timeout, out of resources (0xA7xx),
  processing failure (0x0110) or resource limitation (0x0213).

``SendError.kind`` tells "connection refused", "timed out", "aborted by peer" and
"association rejected" apart. pynetdicom reports an association that never came about
only as aborted; the SCU then connects once more with a plain socket to tell a refused
connection and a peer that does not answer from one that closed on us.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Sequence

import pydicom
from pynetdicom import AE
from pynetdicom.status import code_to_category

from dicom_node.config import Destination
from dicom_node.errors import SendError, SendFailure
from dicom_node.send.status import SendOutcome, status_meaning, transient_status
from dicom_node.tls import client_context

__all__ = ["send_file", "send_files"]

log = logging.getLogger(__name__)

_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason given",
    0x03: "abstract syntax (SOP class) not supported",
    0x04: "transfer syntax not supported",
}


def send_file(
    path: Path, destination: Destination, *, calling_ae_title: str, timeout: float = 30.0
) -> SendOutcome:
    """C-STORE the Part 10 file at ``path``; raise ``SendError`` unless the destination took it."""
    return send_files([path], destination, calling_ae_title=calling_ae_title, timeout=timeout)


def send_files(
    paths: Sequence[Path], destination: Destination, *, calling_ae_title: str, timeout: float = 30.0
) -> SendOutcome:
    """C-STORE the Part 10 files at ``paths`` over one association, in order; raise
    ``SendError`` at the first the destination does not take (a later attempt sends
    them all again: same UIDs, so the destination keeps one copy). The outcome carries
    the first warning."""
    datasets = [pydicom.dcmread(path) for path in paths]
    peer = destination.peer
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets})
    for sop_class in sorted({sop for sop, _ in contexts}):
        ae.add_requested_context(sop_class, sorted({ts for sop, ts in contexts if sop == sop_class}))
    tls_args = (client_context(destination.tls), None) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    refused = [(sop, ts) for sop, ts in contexts if (sop, ts) not in accepted]
    if refused and (assoc.is_established or assoc.rejected_contexts):
        # pynetdicom aborts an association in which no context was accepted
        if assoc.is_established:
            assoc.release()
        sop_class, transfer_syntax = refused[0]
        results = [c.result for c in assoc.rejected_contexts if c.abstract_syntax == sop_class]
        why = _CONTEXT_RESULTS.get(results[0], f"result {results[0]}") if results else "not accepted"
        raise SendError(
            f"{peer} refuses {sop_class.name} in {transfer_syntax.name}: presentation context rejected ({why})",
            peer=peer, permanent=True, kind=SendFailure.CONTEXT_REJECTED,
        )
    if not assoc.is_established:
        raise _association_failure(assoc, peer, destination, timeout)
    warning = None
    try:
        for dataset in datasets:
            outcome = _store(assoc, dataset, peer, timeout)
            warning = warning or outcome.warning
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d instance(s) of series %s to %s", len(datasets), datasets[0].SeriesInstanceUID, peer)
    return SendOutcome(0xB000 if warning else 0x0000, warning)


def _store(assoc, dataset: pydicom.Dataset, peer: str, timeout: float) -> SendOutcome:
    """One C-STORE in an established association."""
    started = time.monotonic()
    try:
        status = assoc.send_c_store(dataset)
    except (RuntimeError, ValueError, OSError) as exc:
        raise SendError(f"C-STORE to {peer} failed: {type(exc).__name__}: {exc}", peer=peer) from exc
    if not status or "Status" not in status:
        if time.monotonic() - started >= timeout * 0.95:
            raise SendError(f"{peer} did not answer the C-STORE within {timeout:g} s (timed out)", peer=peer,
                            kind=SendFailure.TIMED_OUT)
        raise SendError(f"{peer} aborted the association during the C-STORE (aborted by peer)", peer=peer,
                        kind=SendFailure.ABORTED_BY_PEER)
    code = int(status.Status)
    category = code_to_category(code)
    if category == "Success":
        return SendOutcome(code)
    if category == "Warning":
        warning = f"0x{code:04X} ({status_meaning(code)})"
        log.warning("sent %s to %s with warning %s", dataset.SOPInstanceUID, peer, warning)
        return SendOutcome(code, warning)
    raise SendError(
        f"{peer} answered C-STORE with status 0x{code:04X} ({status_meaning(code)})",
        peer=peer, status=code, permanent=not transient_status(code), kind=SendFailure.FAILURE_STATUS,
    )


def _association_failure(assoc, peer: str, destination: Destination, timeout: float) -> SendError:
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result_str", None) or "rejected"
        source = getattr(primitive, "source_str", None) or "?"
        reason = getattr(primitive, "reason_str", None) or "?"
        permanent = getattr(primitive, "result", None) == 0x01
        return SendError(f"association to {peer} rejected ({result}; {source}: {reason})", peer=peer,
                         permanent=permanent, kind=SendFailure.ASSOCIATION_REJECTED)
    kind = _diagnose_connection(destination.host, destination.port, timeout)
    what = {
        "connection refused": "connection refused (nothing listens there)",
        "timed out": f"no answer within {timeout:g} s (timed out)",
    }.get(kind, "the peer closed the connection before the association was accepted (aborted by peer)")
    return SendError(f"association to {peer} failed: {what}", peer=peer, kind=kind)


def _diagnose_connection(host: str, port: int, timeout: float) -> str:
    """Why no association came about: ``connection refused``, ``timed out`` or
    ``aborted by peer`` (a TCP connection opens, so the peer closed the association)."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            return "aborted by peer"
    except ConnectionRefusedError:
        return "connection refused"
    except (socket.timeout, TimeoutError):
        return "timed out"
    except OSError:
        return "connection refused"
