"""Errors of the service layer.

``NodeError`` is the root. ``ConfigError`` stops start-up with the offending key named;
``InvalidUIDError`` refuses a UID before it can become part of a path; ``SendError``
marks a send of a result object to a destination that did not succeed, by DIMSE
C-STORE (``dicom_node.send.dimse``) or DICOMweb STOW-RS (``dicom_node.send.dicomweb``): it carries the
peer, the DICOM status where one came back, whether a retry can help (``permanent``)
and the kind of failure (``kind``), so that callers branch on fields, never on text.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["NodeError", "ConfigError", "InvalidUIDError", "SendFailure", "SendError"]


class NodeError(Exception):
    """Root of the service's own errors."""


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or invalid."""


class InvalidUIDError(NodeError):
    """A value that should be a DICOM UID is not one."""


class SendFailure(StrEnum):
    """What kind of failure a ``SendError`` is (see there); its value is the label."""

    CONNECTION_REFUSED = "connection refused"
    TIMED_OUT = "timed out"
    ABORTED_BY_PEER = "aborted by peer"
    ASSOCIATION_REJECTED = "association rejected"
    CONTEXT_REJECTED = "context rejected"
    FAILURE_STATUS = "failure status"
    NOT_AUTHORISED = "not authorised"
    TLS_ERROR = "tls error"
    LOCAL_ERROR = "local error"


class SendError(NodeError):
    """A send to a destination failed: a C-STORE (DIMSE) or a STOW-RS request (DICOMweb).

    ``peer`` names the destination as logs do: ``AE@host:port``, or the DICOMweb URL.
    ``status`` is the DICOM status where one came back: the C-STORE response status, or
    the FailureReason of the first instance a STOW-RS answer lists as failed; None
    otherwise (an HTTP status alone is in the message). ``permanent``: a retry cannot
    help (the outbox row fails at once); otherwise it is retried with back-off.

    ``kind`` (a ``SendFailure``) tells the failures apart in reasons and in
    ``dicom_node_send_failures_total{destination,kind}``:

    * ``connection refused``: nothing listens there, or no connection can be made;
    * ``timed out``: no answer within ``send.timeout_seconds``;
    * ``aborted by peer``: the peer closed the association or the connection;
    * ``association rejected``: A-ASSOCIATE-RJ (DIMSE; permanent or transient as the peer says);
    * ``context rejected``: the peer refuses the object's SOP class or transfer syntax (DIMSE);
    * ``failure status``: a C-STORE failure status, instances a STOW-RS answer lists as
      failed or leaves unaccounted, or an HTTP error status;
    * ``not authorised``: the DICOMweb server refuses the credentials (HTTP 401/403);
    * ``tls error``: the TLS handshake or the certificate check (its CA, its host name) failed;
    * ``local error``: on this side: a result file unreadable or gone, the auth secret
      unreadable, an unexpected error of the DICOM or HTTP library.
    """

    def __init__(self, message: str, *, peer: str, status: int | None = None, permanent: bool = False,
                 kind: SendFailure = SendFailure.LOCAL_ERROR) -> None:
        super().__init__(message)
        self.peer = peer
        self.status = status
        self.permanent = permanent
        self.kind = SendFailure(kind)
