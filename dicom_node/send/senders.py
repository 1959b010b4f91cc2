"""One sender per protocol behind one interface: ``sender_for(destination)`` is a
function that sends the files of one result object to that destination, by DIMSE
C-STORE (``dicom_node.send.dimse``) or DICOMweb STOW-RS (``dicom_node.send.dicomweb``),
and returns its ``SendOutcome`` or raises ``SendError``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol, Sequence

from dicom_node.config import Destination
from dicom_node.send.dicomweb import stow_files
from dicom_node.send.dimse import send_files
from dicom_node.send.status import SendOutcome

__all__ = ["Sender", "sender_for"]


class Sender(Protocol):
    """Sends the files of one result object; the outcome, or ``SendError``."""

    def __call__(self, paths: Sequence[Path]) -> SendOutcome: ...


def sender_for(destination: Destination, *, calling_ae_title: str, timeout: float) -> Sender:
    """The sender of ``destination``'s protocol."""
    if destination.protocol == "dicomweb":
        return functools.partial(stow_files, destination=destination, timeout=timeout)
    return functools.partial(send_files, destination=destination, calling_ae_title=calling_ae_title, timeout=timeout)
