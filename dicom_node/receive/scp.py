"""The storage SCP: C-ECHO and C-STORE, answered after the instance is safe on disk.

The C-STORE handler does little: it hands the instance to ``receive.intake`` (the path
that a pull's retrieved instances take too: check the UIDs, write the encoded bytes
atomically into the spool, record the instance in the state store) and answers its
status; it keeps the association's bookkeeping (completion, audit). Pixels are
never decoded here. Failures map to DICOM statuses: 0xA700 (out of resources) when the
disk is below its free-space threshold, the series exceeds its size bound, the write
fails or the state store is full; 0xC210 (cannot understand) for invalid identifiers or
an undecodable dataset; 0xA900 for an image whose pixel data is missing, empty or of the
wrong length (``dicom_node.receive.checks``); 0xC211 for anything else. Every refusal of
an instance whose series is known is recorded with its reason: the series is then known
not to be whole, and is never processed as if it were (``receive/completion``).
Only callers listed in the security settings may associate, and only to the node's own
AE title (unless ``security.accept_any_called_ae_title``); any other association is
rejected with A-ASSOCIATE-RJ (calling, or called, AE title not recognised) and logged. MR images (classic,
Enhanced and Legacy Converted) are processed later; every other storage class of the
study is accepted and kept but never processed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node.audit import Audit
from dicom_node.config import NodeSettings, SecuritySettings, StorageSettings
from dicom_node.metrics import Metrics
from dicom_node.receive.completion import Completion
from dicom_node.receive.intake import Intake, read_header
from dicom_node.store.spool import Spool
from dicom_node.store.state import StateStore
from dicom_node.tls import server_context

__all__ = ["TRANSFER_SYNTAXES", "StorageSCP"]

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

@dataclass
class _Transfer:
    """What one association carried of one series, for its one audit event."""

    study: str | None
    received: list[str] = field(default_factory=list)
    refused: list[tuple[str | None, int, str]] = field(default_factory=list)  # SOP UID, status, reason


class StorageSCP:
    """The listening side of the node; its handlers get their dependencies explicitly."""

    def __init__(
        self,
        settings: NodeSettings,
        security: SecuritySettings,
        storage: StorageSettings,
        spool: Spool,
        state: StateStore,
        completion: Completion,
        metrics: Metrics,
        audit: Audit | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit or Audit.off()
        # per association, per series: the instances stored and refused, audited at its end
        self._transfers: dict[int, dict[str | None, _Transfer]] = {}
        self.security = security
        self.storage = storage
        self.spool = spool
        self.state = state
        self.completion = completion
        self.metrics = metrics
        self.intake = Intake(storage, spool, state, metrics)
        self._series_by_assoc: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_associations = settings.max_associations
        self.ae.maximum_pdu_size = settings.max_pdu_size
        # A peer that stalls or sends garbage must not hold an association slot for long.
        timeout = settings.network_timeout_seconds
        self.ae.network_timeout = self.ae.acse_timeout = self.ae.dimse_timeout = timeout
        self.ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self._server = None
        self._thread: threading.Thread | None = None  # the one that accepts associations

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
        ]
        tls = self.settings.tls
        before = set(threading.enumerate())
        self._server = self.ae.start_server(
            (self.settings.bind_address, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=server_context(tls) if tls else None,
        )
        # pynetdicom keeps no handle on the thread it serves on: the one it just started
        self._thread = next((thread for thread in threading.enumerate()
                             if thread not in before and thread.name.startswith("AcceptorServer")), None)
        log.info(
            "listening as %s on %s:%d%s",
            self.settings.ae_title,
            self.settings.bind_address,
            self.settings.port,
            " (DICOM TLS)" if tls else "",
        )

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.socket.fileno() >= 0

    @property
    def serving(self) -> bool:
        """Listening, and the thread that accepts associations still runs (for ``/healthz``)."""
        return self.listening and self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop listening and abort the associations in progress, waiting up to ``timeout``
        for the established ones' threads (a C-STORE in hand ends): what they acknowledged
        is kept, the sender resends the rest, and nothing arrives while the node stops."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        established = []
        for assoc in server.active_associations:  # a connection not yet associated is closed too
            if assoc.is_established:
                log.warning("association from %s aborted: the node is stopping", assoc.requestor.ae_title)
                established.append(assoc)
            assoc.abort()
        deadline = time.monotonic() + timeout
        for assoc in established:
            assoc.join(max(0.0, deadline - time.monotonic()))

    # -- handlers ---------------------------------------------------------------------
    def _handle_requested(self, event: evt.Event) -> None:
        """Reject (A-ASSOCIATE-RJ, rejected-permanent, service-user) an unknown calling AE
        title (reason 0x03), then a called AE title other than ours (reason 0x07) unless
        ``security.accept_any_called_ae_title``."""
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        calling = primitive.calling_ae_title if primitive else ""
        called = primitive.called_ae_title if primitive else ""
        if not self.security.admits(calling, requestor.address):
            log.warning("association rejected: calling AE %r from %s is not allowed", calling, requestor.address)
            self.audit.record_association(accepted=False, calling_ae=calling, called_ae=called,
                                          address=requestor.address, port=requestor.port,
                                          reason="calling AE title not recognised (security.allowed_callers)")
            self._reject(event, 0x03)  # calling AE title not recognised
        elif not self.security.accept_any_called_ae_title and called.strip() != self.settings.ae_title.strip():
            log.warning("association rejected: %r from %s called AE %r, this node is %r",
                        calling, requestor.address, called, self.settings.ae_title)
            self.audit.record_association(accepted=False, calling_ae=calling, called_ae=called,
                                          address=requestor.address, port=requestor.port,
                                          reason=f"called AE title not recognised (this node is"
                                                 f" {self.settings.ae_title})")
            self._reject(event, 0x07)  # called AE title not recognised

    @staticmethod
    def _reject(event: evt.Event, reason: int) -> None:
        """Send A-ASSOCIATE-RJ (rejected-permanent, service-user, ``reason``) and close."""
        try:
            event.assoc.acse.send_reject(0x01, 0x01, reason)
        except Exception as exc:  # the peer already broke the protocol: just drop it
            log.warning("could not send the rejection (%s); dropping the connection", type(exc).__name__)
        finally:
            event.assoc.kill()

    def _handle_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._series_by_assoc[id(event.assoc)] = set()
        requestor = event.assoc.requestor
        log.info("association accepted from %s (%s:%s)", requestor.ae_title, requestor.address, requestor.port)
        self.audit.record_association(accepted=True, calling_ae=requestor.ae_title,
                                      called_ae=event.assoc.acceptor.ae_title, address=requestor.address,
                                      port=requestor.port)

    def _handle_store(self, event: evt.Event) -> int:
        """A thin adapter over ``Intake.store``: the association's series for completion,
        and the outcome counted into its audit event."""
        try:  # only the elements the intake reads (never pynetdicom's full ``event.dataset``)
            dataset = read_header(event.request.DataSet, event.context.transfer_syntax)
        except Exception as exc:  # an undecodable dataset
            outcome = self.intake.undecodable(exc)
        else:
            outcome = self.intake.store(
                dataset, event.encoded_dataset, str(event.context.transfer_syntax),
                str(event.request.AffectedSOPClassUID), event.assoc.requestor.ae_title,
                affected_sop_instance_uid=event.request.AffectedSOPInstanceUID,
                on_series=lambda series_uid: self._carried(event, series_uid),
            )
        self._note(event, outcome.study_instance_uid, outcome.series_instance_uid, outcome.sop_instance_uid,
                   None if outcome.stored else outcome.status, outcome.reason)
        return outcome.status

    def _carried(self, event: evt.Event, series_uid: str) -> None:
        """The association carries the series: completion holds it open until it ends."""
        with self._lock:
            carried = self._series_by_assoc.setdefault(id(event.assoc), set())
            first_in_assoc = series_uid not in carried
            carried.add(series_uid)
        if first_in_assoc:
            self.completion.association_started([series_uid])

    def _note(self, event: evt.Event, study: str | None, series: str | None, sop: str | None,
              status: int | None = None, reason: str = "") -> None:
        """Count an instance stored (``status`` None) or refused into its association's
        audit event for its series (written when the association ends)."""
        with self._lock:
            transfer = self._transfers.setdefault(id(event.assoc), {}).setdefault(series, _Transfer(study))
            if status is None:
                transfer.received.append(sop or "")
            else:
                transfer.refused.append((sop, status, reason))

    def _end(self, event: evt.Event, *, released: bool) -> None:
        with self._lock:
            carried = self._series_by_assoc.pop(id(event.assoc), None)
            transfers = self._transfers.pop(id(event.assoc), {})
        requestor = event.assoc.requestor
        for series, transfer in transfers.items():  # one audit event per series and association
            self.audit.record_received(calling_ae=requestor.ae_title, address=requestor.address,
                                       study=transfer.study, series=series, received=transfer.received,
                                       refused=transfer.refused)
        if carried is not None:
            self.completion.association_ended(carried, released=released)

    def _handle_released(self, event: evt.Event) -> None:
        log.info("association released by %s", event.assoc.requestor.ae_title)
        self._end(event, released=True)

    def _handle_aborted(self, event: evt.Event) -> None:
        log.info("association aborted (%s)", event.assoc.requestor.ae_title)
        self._end(event, released=False)

    def _handle_closed(self, event: evt.Event) -> None:
        self._end(event, released=False)


def _handle_echo(event: evt.Event) -> int:
    return 0x0000
