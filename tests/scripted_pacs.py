"""A storage SCP (pynetdicom) that answers as a test tells it, for the ways a PACS says no.

``behaviour`` applies to the next C-STORE (or, for ``refuse``, to every association
until changed): ``accept``, ``refuse`` (no presentation context for SEG),
``status`` (answer ``status_code``), ``abort`` (abort the association mid-operation),
``stall`` (answer nothing until the sender has given up). After one misbehaving
C-STORE it accepts again, so a retry succeeds. Every C-STORE answered with success or
a warning is recorded in ``receptions`` (its bytes), so a test counts deliveries.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import SegmentationStorage

from tests.support.paths import LOCALHOST, free_port

_SEG_CLASSES = {str(SegmentationStorage), "1.2.840.10008.5.1.4.1.1.66.7"}  # Segmentation, Label Map


@dataclass
class Reception:
    sop_instance_uid: str
    referenced_series: str
    data: bytes


@dataclass
class ScriptedPACS:
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    behaviour: str = "accept"
    status_code: int = 0x0000
    receptions: list[Reception] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # the behaviour applied to each C-STORE

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax)
        self._all = list(self.ae.supported_contexts)
        self._server = None

    def start(self) -> "ScriptedPACS":
        self._server = self.ae.start_server(
            (LOCALHOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def set(self, behaviour: str, status_code: int = 0x0000) -> None:
        with self._lock:
            self.behaviour, self.status_code = behaviour, status_code
            self._server.contexts = (
                [build_context(c.abstract_syntax, c.transfer_syntax) for c in self._all
                 if c.abstract_syntax not in _SEG_CLASSES]
                if behaviour == "refuse" else self._all
            )

    def received(self, series_instance_uid: str) -> list[Reception]:
        return [r for r in self.receptions if r.referenced_series == series_instance_uid]

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            behaviour, code = self.behaviour, self.status_code
            if behaviour not in ("accept", "refuse"):
                self.behaviour = "accept"  # misbehave once
            self.applied.append(behaviour)
        if behaviour == "abort":
            event.assoc.abort()
            return 0xC000
        if behaviour == "stall":
            self._released.wait(timeout=event.assoc.dimse_timeout or 30)
            return 0xC000  # too late: the sender gave up long ago
        answer = code if behaviour == "status" else 0x0000
        if answer == 0x0000 or 0xB000 <= answer <= 0xBFFF:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.receptions.append(Reception(
                str(ds.SOPInstanceUID), str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID),
                event.encoded_dataset(),
            ))
        return answer
