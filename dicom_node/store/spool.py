"""The spool: received instances and produced result objects on disk, written atomically.

Layout under ``spool_dir``::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    results/<job id>/<object key>/<SOPInstanceUID>.dcm   (seg, rtstruct, overlay, report, ...)
    tmp/                       (partial writes; never read)

Every file is written to ``tmp/``, flushed to disk, then renamed into place, so a crash
leaves either the whole file or none. UIDs are checked against the DICOM UID syntax
before they become part of a path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import InvalidUIDError

__all__ = ["Spool", "validate_uid"]

# PS3.5 9.1: components of digits separated by dots, no leading zero in a multi-digit
# component, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a syntactically valid DICOM UID, else raise."""
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        shown = repr(value)[:80]
        raise InvalidUIDError(f"{what} {shown} is not a valid DICOM UID")
    return value


@dataclass
class _FolderSync:
    """The fsyncs of one folder: how many callers asked, up to which one an fsync is done."""

    asked: int = 0
    done: int = 0
    running: bool = False


class Spool:
    """Atomic file storage for received instances and results."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.results = root / "results"
        self.tmp = root / "tmp"
        for folder in (self.incoming, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._syncs_lock = threading.Condition()
        self._syncs: dict[Path, _FolderSync] = {}  # the folders being fsynced, and who waits

    def series_folder(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        study = validate_uid(study_instance_uid, "StudyInstanceUID")
        series = validate_uid(series_instance_uid, "SeriesInstanceUID")
        return self.incoming / study / series

    def store_instance(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        encoded: bytes,
        *,
        sync_folder: bool = True,
    ) -> Path:
        """Write one received instance (Part 10 bytes) atomically; return its path.
        ``sync_folder=False`` leaves the fsync of its folder (which makes the rename
        durable) to the caller, who must call ``sync_folder`` before relying on it."""
        folder = self.series_folder(study_instance_uid, series_instance_uid)
        name = validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm"
        return self._write_atomically(folder / name, encoded, sync_folder=sync_folder)

    def sync_folder(self, folder: Path) -> None:
        """Make the files renamed into ``folder`` so far durable: an fsync of the folder
        begun after this call, shared with the threads asking for the same folder
        meanwhile (one fsync then serves all of them; other folders' go on at once)."""
        with self._syncs_lock:
            sync = self._syncs.setdefault(folder, _FolderSync())
            sync.asked += 1
            mine = sync.asked
            while sync.done < mine:
                if sync.running:
                    self._syncs_lock.wait()
                    continue
                sync.running, upto = True, sync.asked  # every rename asked for so far came before this fsync
                self._syncs_lock.release()
                try:
                    _fsync_dir(folder)
                except BaseException:
                    self._syncs_lock.acquire()
                    sync.running = False
                    self._syncs_lock.notify_all()  # a waiter tries again itself
                    raise
                self._syncs_lock.acquire()
                sync.running, sync.done = False, upto
                self._syncs_lock.notify_all()
            if not sync.running and sync.done == sync.asked:
                self._syncs.pop(folder, None)  # nobody waits on it: forgotten

    def result_folder(self, job_id: int, key: str | None = None) -> Path:
        """The folder of a job's results, or of one of its objects (``key``)."""
        folder = self.results / str(int(job_id))
        if key is None:
            return folder
        if not re.fullmatch(r"([A-Za-z0-9_-]{1,32}\.)?[a-z0-9-]{1,32}", key):  # [PRESET.]OBJECT
            raise ValueError(f"not an object key: {key!r}")
        return folder / key

    def store_result(self, job_id: int, key: str, sop_instance_uid: str, encoded: bytes) -> Path:
        """Write one instance of a produced object atomically; return its path."""
        name = validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm"
        return self._write_atomically(self.result_folder(job_id, key) / name, encoded)

    def clear_results(self, job_id: int) -> None:
        """Delete what an earlier run of this job saved (it crashed, or a model failed after
        saving some objects), so that a new run's folders hold its own objects only; a job
        still processing has no outbox row that could point there."""
        folder = self.result_folder(job_id)
        if folder.is_dir():
            shutil.rmtree(folder)

    def _write_atomically(self, target: Path, data: bytes, *, sync_folder: bool = True) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.replace(tmp_name, target)
            except FileNotFoundError:  # retention removed the folder, empty, since the mkdir above
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        if sync_folder:
            _fsync_dir(target.parent)
        return target


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
