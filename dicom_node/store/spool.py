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


class Spool:
    """Atomic file storage for received instances and results."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.results = root / "results"
        self.tmp = root / "tmp"
        for folder in (self.incoming, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

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
    ) -> Path:
        """Write one received instance (Part 10 bytes) atomically; return its path."""
        folder = self.series_folder(study_instance_uid, series_instance_uid)
        name = validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm"
        return self._write_atomically(folder / name, encoded)

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

    def _write_atomically(self, target: Path, data: bytes) -> Path:
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
        _fsync_dir(target.parent)
        return target


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
