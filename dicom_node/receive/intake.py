"""The one way an instance enters the node, however it came.

An instance pushed by a C-STORE (``receive.scp``), one that a C-GET association of a
pull brought as a C-STORE sub-operation, and one that a WADO-RS retrieve of a pull
returned all go through ``Intake.store``: its UIDs checked, ``receive.checks``, the
spool's free space and the series' instance limit, the encoded bytes written atomically
into the spool, the instance recorded in the state store with its placement (and only
then a success), every refusal recorded with its series. It knows nothing of
associations: the callers keep their own bookkeeping (completion's open associations,
audit events) and turn the ``Stored`` outcome into their answer.

What may be done once for several instances, is: the rows of concurrent associations
are committed together (``Database.grouped``, one fsync of the WAL), and one fsync of a
folder serves every instance renamed into it before it began (``Spool.sync_folder``),
each before its row is committed; the free space is asked of the
file system for each instance only near ``storage.min_free_bytes``; the series' limit is
checked against a count kept in memory, counted again before a refusal. The SCP decodes
only the elements read here (``read_header``).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Callable

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from dicom_node.config import StorageSettings
from dicom_node.errors import InvalidUIDError
from dicom_node.metrics import Metrics
from dicom_node.receive.checks import CANNOT_UNDERSTAND, CHECKED_KEYWORDS, instance_problem
from dicom_node.store.db import cannot_write
from dicom_node.store.spool import Spool, validate_uid
from dicom_node.store.state import SeriesRef, StateStore
from pipeline.input.wholeness import placement_of, placement_tags

__all__ = ["Intake", "Stored", "read_header", "SUCCESS", "OUT_OF_RESOURCES", "PROCESSING_FAILURE"]

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0xC211

# every element that Intake.store reads: its UIDs, receive.checks and the placement
_HEADER_TAGS = sorted({Tag("StudyInstanceUID"), Tag("SeriesInstanceUID"), Tag("SOPInstanceUID"),
                       *map(Tag, CHECKED_KEYWORDS), *placement_tags()})
_SPACE_MARGIN = 256 * 1024 * 1024  # far above storage.min_free_bytes: the free space need not be asked each time
_SPACE_RECHECK_SECONDS = 1.0


def read_header(encoded: BytesIO, transfer_syntax: UID) -> Dataset:
    """Decode of a C-STORE's dataset (as the DIMSE message carried it, no file meta) the
    elements ``Intake.store`` reads and no other: every element is still walked, so a
    truncated dataset still fails here, but the others are skipped rather than built
    (a third of pynetdicom's full decode, and the only decode on the C-STORE path)."""
    stream = encoded
    stream.seek(0)
    if transfer_syntax.is_deflated:
        stream = BytesIO(zlib.decompress(encoded.getvalue(), -zlib.MAX_WBITS))
    return read_dataset(stream, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                        specific_tags=_HEADER_TAGS)


@dataclass(frozen=True)
class Stored:
    """What became of one instance: the DICOM status to answer, its UIDs as far as they
    could be read, and why it was refused (empty when stored)."""

    status: int
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    reason: str = ""

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


class Intake:
    """Checks, writes and records instances; safe to call from several threads."""

    def __init__(self, storage: StorageSettings, spool: Spool, state: StateStore, metrics: Metrics) -> None:
        self.storage = storage
        self.spool = spool
        self.state = state
        self.metrics = metrics
        # the spool's free space as last asked of the file system, and what was written since
        self._space_lock = threading.Lock()
        self._space_at = -_SPACE_RECHECK_SECONDS
        self._space_free = 0
        self._space_spent = 0

    def _free_bytes(self) -> int | None:
        """The spool's free bytes when below ``storage.min_free_bytes`` (refuse), else
        None. Asked of the file system for every instance within ``_SPACE_MARGIN`` of the
        threshold; further above it, at most once per ``_SPACE_RECHECK_SECONDS``, the
        bytes written since counted off (others' writes in that second are what the
        margin is for)."""
        now = time.monotonic()
        with self._space_lock:
            if (now - self._space_at < _SPACE_RECHECK_SECONDS
                    and self._space_free - self._space_spent >= self.storage.min_free_bytes + _SPACE_MARGIN):
                return None
        free = shutil.disk_usage(self.spool.root).free
        with self._space_lock:
            self._space_at, self._space_free, self._space_spent = now, free, 0
        return free if free < self.storage.min_free_bytes else None

    def store(
        self,
        dataset: Dataset,
        encoded: bytes | Callable[[], bytes],
        transfer_syntax: str,
        sop_class_uid: str,
        calling_ae: str,
        *,
        affected_sop_instance_uid: str | None = None,
        on_series: Callable[[str], None] | None = None,
    ) -> Stored:
        """Store one instance. ``encoded``: its bytes as they go into the spool (a file
        with its meta), or a callable that makes them, called only once it is accepted;
        ``affected_sop_instance_uid``: the UID a C-STORE request announced, which the
        dataset must carry; ``on_series``: called with the series UID once the UIDs are
        known good, before any other check (the SCP counts the association's series)."""
        try:
            study_uid = validate_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = validate_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
            if affected_sop_instance_uid is not None and sop_uid != affected_sop_instance_uid:
                raise InvalidUIDError("SOPInstanceUID differs from the request's AffectedSOPInstanceUID")
            placement = placement_of(dataset).to_json()
        except InvalidUIDError as exc:
            log.warning("C-STORE refused: %s", exc)
            self.metrics.instances_refused.labels(f"0x{CANNOT_UNDERSTAND:04X}").inc()
            return Stored(CANNOT_UNDERSTAND, reason="invalid UID")
        except Exception as exc:  # an undecodable dataset
            return self.undecodable(exc)
        ref = SeriesRef(study_uid, series_uid, calling_ae, self.spool.series_folder(study_uid, series_uid))
        if on_series is not None:
            on_series(series_uid)
        problem = instance_problem(dataset, transfer_syntax)
        if problem is not None:
            return self._refuse(ref, sop_uid, problem.status, problem.reason)
        free = self._free_bytes()
        if free is not None:
            return self._refuse(ref, sop_uid, OUT_OF_RESOURCES,
                                f"spool below storage.min_free_bytes ({free} bytes free)")
        if not self.state.series_has_room(series_uid, self.storage.max_series_instances):
            limit = self.storage.max_series_instances
            return self._refuse(ref, sop_uid, OUT_OF_RESOURCES,
                                f"the series exceeds storage.max_series_instances ({limit})")
        try:
            data = encoded() if callable(encoded) else encoded
            # the file fsynced and renamed into place; then its folder's fsync (the rename made
            # durable), one for every instance renamed into that folder meanwhile
            path = self.spool.store_instance(study_uid, series_uid, sop_uid, data, sync_folder=False)
            self.spool.sync_folder(path.parent)
            with self._space_lock:
                self._space_spent += len(data)
        except OSError as exc:
            return self._refuse(ref, sop_uid, OUT_OF_RESOURCES, f"cannot write to the spool: {exc}")
        try:
            self.state.record_instance(ref, sop_uid, sop_class_uid, path, placement=placement)
        except sqlite3.OperationalError as exc:
            if cannot_write(exc):
                log.error("C-STORE of %s refused: the state store is full: %s", sop_uid, exc)
                self.metrics.instances_refused.labels(f"0x{OUT_OF_RESOURCES:04X}").inc()
                return Stored(OUT_OF_RESOURCES, study_uid, series_uid, sop_uid, "the state store is full")
            log.exception("C-STORE of %s failed: cannot record it in the state store", sop_uid)
            return Stored(PROCESSING_FAILURE, study_uid, series_uid, sop_uid, "cannot record it")
        except Exception:
            log.exception("C-STORE of %s failed: cannot record it in the state store", sop_uid)
            return Stored(PROCESSING_FAILURE, study_uid, series_uid, sop_uid, "cannot record it")
        self.metrics.instances_received.inc()
        return Stored(SUCCESS, study_uid, series_uid, sop_uid)

    def undecodable(self, exc: BaseException) -> Stored:
        """The refusal of a dataset that cannot be decoded (counted; nothing recorded,
        since not even its series is known)."""
        log.warning("C-STORE refused: cannot decode the dataset: %s", type(exc).__name__)
        self.metrics.instances_refused.labels(f"0x{CANNOT_UNDERSTAND:04X}").inc()
        return Stored(CANNOT_UNDERSTAND, reason="cannot decode the dataset")

    def _refuse(self, ref: SeriesRef, sop_uid: str, status: int, reason: str) -> Stored:
        """Refuse with ``status``, and record the refusal with its series so that the
        series is known not whole (and says why) until the sender stores the instance
        after all."""
        log.warning("C-STORE of %s (series %s) refused with 0x%04X: %s", sop_uid, ref.series_instance_uid,
                    status, reason)
        self.metrics.instances_refused.labels(f"0x{status:04X}").inc()
        try:
            self.state.record_refusal(ref, sop_uid, status, reason)
        except Exception as exc:  # a full database: the refusal is logged, the status still goes back
            log.error("the refusal of %s could not be recorded: %s", sop_uid, exc)
        return Stored(status, ref.study_instance_uid, ref.series_instance_uid, sop_uid, reason)
