"""What both senders make of a destination's answer: the outcome of a send that went
through, and the meaning of a DICOM status (which failures a later attempt may not meet).
"""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

__all__ = ["SendOutcome", "status_meaning", "transient_status"]

_TRANSIENT_STATUSES = {0x0110, 0x0213}  # processing failure, resource limitation


@dataclass(frozen=True)
class SendOutcome:
    """A C-STORE the destination accepted: its status, and the warning if it gave one."""

    status: int
    warning: str | None = None


def status_meaning(code: int) -> str:
    """The standard's words for a C-STORE status code."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if known is not None and known[1]:
        return known[1]
    return code_to_category(code).lower()


def transient_status(code: int) -> bool:
    """A failure status a later attempt may not meet (out of resources, processing failure)."""
    return 0xA700 <= code <= 0xA7FF or code in _TRANSIENT_STATUSES
