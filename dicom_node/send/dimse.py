"""The storage SCU: C-STORE a produced object (its files) to a DIMSE destination.

``send_files`` sends every file of one object over one association and returns when
the destination took them all (success, or a warning such as 0xB000 coercion of data
elements, which is recorded); ``send_file`` sends one. Each file goes as it lies on
disk, read in PDU-sized chunks and never decoded (only its file meta and series UID are
read, to negotiate), and read only as fast as the peer takes it (``_SendQueue``):
memory stays flat whatever the object's size.
Anything else raises ``SendError``, which names the peer, the DICOM status in hex and
its meaning where there is one, and says whether trying again can help:

* permanent (the job fails at once): the destination refuses the SEG's SOP class or
  transfer syntax (presentation context rejected), rejects the association
  permanently, or answers a failure status that a retry cannot change (0xA9xx data
  set does not match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not
  supported, 0x0124 not authorised, ...);
* transient (the job is retried with back-off): no connection, an association rejected
  transiently or aborted, no answer within the timeout, out of resources (0xA7xx),
  processing failure (0x0110) or resource limitation (0x0213), the TLS handshake or the
  certificate check fails (kind ``tls error``: a certificate no CA of ``tls`` vouches
  for, or one that does not name ``host``; the CA file is read at every send, so the
  retry after the fix succeeds without a restart).

``SendError.kind`` tells "connection refused", "timed out", "aborted by peer" and
"association rejected" apart. pynetdicom reports an association that never came about
only as aborted; the SCU then connects once more with a plain socket to tell a refused
connection and a peer that does not answer from one that closed on us.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Sequence

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from dicom_node.config import Destination
from dicom_node.errors import ConfigError, SendError, SendFailure
from dicom_node.send.status import SendOutcome, status_meaning, transient_status
from dicom_node.tls import client_context

__all__ = ["send_file", "send_files", "echo"]

log = logging.getLogger(__name__)

# pynetdicom's documented switch: a C-STORE given a file path sends the file's encoded
# dataset in chunks instead of decoding it (which needs an accepted context in the file's
# own transfer syntax: the only one send_files proposes). The node sends nothing else.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

_READ_AHEAD_BYTES = 4 * 2**20  # what a C-STORE may have read from its file before the socket took it

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
    peer = destination.peer
    headers = [_header(path, peer) for path in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = sorted({(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID) for meta, _ in headers})
    for sop_class in sorted({sop for sop, _ in contexts}):
        ae.add_requested_context(sop_class, sorted({ts for sop, ts in contexts if sop == sop_class}))
    assoc = _associate(ae, destination)
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
    _bound_read_ahead(assoc, timeout)
    warning = None
    try:
        for path, (meta, _) in zip(paths, headers):
            outcome = _store(assoc, path, str(meta.MediaStorageSOPInstanceUID), peer, timeout)
            warning = warning or outcome.warning
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d instance(s) of series %s to %s", len(paths), headers[0][1], peer)
    return SendOutcome(0xB000 if warning else 0x0000, warning)


class _SendQueue(queue.Queue):
    """pynetdicom's queue of what its reactor thread is to send, with back-pressure.

    A C-STORE from a file puts the file's PDUs here as fast as it reads them, and the
    reactor sends them as fast as the peer takes them: unbounded, as pynetdicom makes it,
    the queue holds most of a large file. Here a P-DATA waits while ``limit`` of them
    are queued. It never waits for good: once the reactor has stopped (the association
    ended) or has taken nothing for ``stall`` seconds (a peer that stopped reading), the
    queue takes everything as pynetdicom's does, and the C-STORE ends as it would have
    (no answer within the timeout).
    """

    def __init__(self, reactor: threading.Thread, limit: int, stall: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.limit = limit
        self.stall = stall
        self.bounded = True

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if self.bounded and isinstance(item, P_DATA):
            waited = 0.0
            with self.not_full:  # notified by every get()
                while self.bounded and self._qsize() >= self.limit:
                    if waited >= self.stall or not self.reactor.is_alive():
                        self.bounded = False
                    elif self.not_full.wait(0.1):
                        waited = 0.0
                    else:
                        waited += 0.1
        super().put(item, block, timeout)


def _bound_read_ahead(assoc, stall: float) -> None:
    """Put a ``_SendQueue`` in place of the new association's (empty) send queue."""
    dul = assoc.dul
    if not dul.to_provider_queue.empty():  # never the case after A-ASSOCIATE-AC: keep pynetdicom's
        return
    pdu = int(assoc.acceptor.maximum_length or 0)  # 0: the peer takes PDUs of any size, a file is one
    dul.to_provider_queue = _SendQueue(dul, max(2, _READ_AHEAD_BYTES // pdu) if pdu else 2, stall)


def _header(path: Path, peer: str) -> tuple[pydicom.dataset.FileMetaDataset, str]:
    """A file's meta information (SOP class and instance, transfer syntax) and its series
    UID, without reading the rest of it (``OSError`` as it comes: a local failure)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except InvalidDicomError as exc:
        raise SendError(f"{path} is not a DICOM Part 10 file: {exc}", peer=peer, permanent=True) from exc
    meta = header.file_meta
    missing = [key for key in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if key not in meta]
    if missing:
        raise SendError(f"{path} lacks {', '.join(missing)} in its file meta information", peer=peer,
                        permanent=True)
    return meta, str(header.get("SeriesInstanceUID", "?"))


def _store(assoc, path: Path, sop_instance_uid: str, peer: str, timeout: float) -> SendOutcome:
    """One C-STORE in an established association, the dataset read from ``path`` in chunks."""
    started = time.monotonic()
    try:
        status = assoc.send_c_store(path)
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
        log.warning("sent %s to %s with warning %s", sop_instance_uid, peer, warning)
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
    if destination.tls is not None:
        refusal = _diagnose_tls(destination, timeout)
        if refusal:
            return SendError(f"TLS with {peer} failed (tls error): {refusal}", peer=peer, kind=SendFailure.TLS_ERROR)
    kind = _diagnose_connection(destination.host, destination.port, timeout)
    what = {
        "connection refused": "connection refused (nothing listens there)",
        "timed out": f"no answer within {timeout:g} s (timed out)",
    }.get(kind, "the peer closed the connection before the association was accepted (aborted by peer)")
    return SendError(f"association to {peer} failed: {what}", peer=peer, kind=kind)


def _associate(ae: AE, destination: Destination):
    """An association to ``destination``, over TLS when it has ``tls``: the host is the
    server_hostname, which the certificate must name (unless ``tls.check_hostname`` is false)."""
    tls_args = (client_context(destination.tls), destination.host) if destination.tls else None
    return ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)


def _diagnose_tls(destination: Destination, timeout: float) -> str | None:
    """Why the TLS handshake with the destination fails (the certificate check's reason,
    such as "IP address mismatch, certificate is not valid for '10.0.0.5'"), or None when it
    succeeds or no connection can be made: pynetdicom only logs it. One handshake, closed
    at once."""
    try:
        context = client_context(destination.tls)
        with socket.create_connection((destination.host, destination.port), timeout=min(timeout, 5.0)) as raw:
            with context.wrap_socket(raw, server_hostname=destination.host):
                return None
    except ssl.SSLCertVerificationError as exc:
        return f"certificate verify failed: {exc.verify_message or exc.reason}"
    except ssl.SSLError as exc:
        return f"handshake failed: {exc.reason or exc}"
    except (OSError, ConfigError):
        return None


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


def echo(destination: Destination, *, calling_ae_title: str, timeout: float = 30.0) -> None:
    """One C-ECHO over a new association (with the destination's TLS, as a send would
    have): return when the destination answers success, else raise ``SendError`` as
    ``send_files`` would (connection refused, association rejected, TLS, a status)."""
    peer = destination.peer
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.is_rejected:
            raise SendError(f"{peer} does not accept the Verification SOP class (C-ECHO)", peer=peer,
                            permanent=True, kind=SendFailure.CONTEXT_REJECTED)
        raise _association_failure(assoc, peer, destination, timeout)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise SendError(f"{peer} did not answer the C-ECHO within {timeout:g} s, or aborted", peer=peer,
                        kind=SendFailure.TIMED_OUT)
    if int(status.Status) != 0x0000:
        raise SendError(f"{peer} answered C-ECHO with status 0x{int(status.Status):04X}", peer=peer,
                        status=int(status.Status), kind=SendFailure.FAILURE_STATUS)
