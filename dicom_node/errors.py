"""Errors of the service layer.

``NodeError`` is the root. ``ConfigError`` stops start-up with the offending key named;
``InvalidUIDError`` refuses a UID before it can become part of a path; ``SendError``
marks a C-STORE to the destination that did not succeed: it carries the peer, the
DICOM status where one came back, and whether a retry can help (``permanent``).
"""

from __future__ import annotations

__all__ = ["NodeError", "ConfigError", "InvalidUIDError", "SendError"]


class NodeError(Exception):
    """Root of the service's own errors."""


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or invalid."""


class InvalidUIDError(NodeError):
    """A value that should be a DICOM UID is not one."""


class SendError(NodeError):
    """A C-STORE to the destination failed.

    ``kind`` tells the failures apart in reasons and metrics: ``connection refused``,
    ``timed out``, ``aborted by peer``, ``association rejected``, ``context rejected``,
    ``failure status``, ``local error``.
    """

    def __init__(self, message: str, *, peer: str, status: int | None = None, permanent: bool = False,
                 kind: str = "local error") -> None:
        super().__init__(message)
        self.peer = peer
        self.status = status
        self.permanent = permanent
        self.kind = kind
