"""Pulls the node runs itself: those started from the status page.

Each runs in its own thread of the node with the same ``Puller`` as ``dicom-node pull``
(the node's state store, spool, metrics and audit). A pull still running when the node
stops is left ``running`` in ``pull_runs`` and resumed when the node starts again.
"""

from __future__ import annotations

import logging
import threading

from dicom_node.audit import Audit
from dicom_node.config import Config
from dicom_node.metrics import Metrics
from dicom_node.pull.common import PullError, PullFilter
from dicom_node.pull.puller import Puller
from dicom_node.store.pulls import PullLog
from dicom_node.store.spool import Spool
from dicom_node.store.state import StateStore

__all__ = ["PullRunner", "STARTED_BY_PAGE"]

log = logging.getLogger(__name__)

STARTED_BY_PAGE = "page"
_FILTER_KEYS = ("study_uid", "accession", "patient_id", "date", "modality", "series_description")


class PullRunner:
    """Starts, resumes and stops the node's own pulls."""

    def __init__(self, config: Config, state: StateStore, spool: Spool, *, metrics: Metrics | None = None,
                 audit: Audit | None = None) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.metrics = metrics
        self.audit = audit
        self.pulls = PullLog(state.db)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}

    def start(self, source_name: str, filters: PullFilter, reprocess: bool = False) -> str:
        """Start a pull in a thread; its key. ``KeyError``: no such source; a pull with the
        same key that still runs is not started twice."""
        source = self.config.source(source_name)
        key = filters.key(source.name)
        with self._lock:
            running = self._threads.get(key)
            if running is not None and running.is_alive():
                return key
            # recorded now, so that a node stopped before the thread runs resumes it
            self.pulls.start_run(key, {"source": source.name, "reprocess": reprocess, **filters.arguments()},
                                 STARTED_BY_PAGE)
            puller = Puller(self.config, source, self.state, self.spool, metrics=self.metrics, audit=self.audit)
            thread = threading.Thread(target=self._run, args=(puller, filters, reprocess), name=f"pull-{key}",
                                      daemon=True)
            self._threads[key] = thread
            thread.start()
        log.info("pull %s from source %s started from the status page", key, source.name)
        return key

    def running(self) -> set[str]:
        with self._lock:
            return {key for key, thread in self._threads.items() if thread.is_alive()}

    def resume(self) -> int:
        """Start again the page-started pulls that had not ended; how many."""
        resumed = 0
        for run in self.pulls.runs(limit=1000):
            if run.started_by != STARTED_BY_PAGE or run.state != "running":
                continue
            arguments = dict(run.arguments)
            try:
                filters = PullFilter(**{key: arguments[key] for key in _FILTER_KEYS if key in arguments})
                self.start(str(arguments["source"]), filters, bool(arguments.get("reprocess")))
            except (KeyError, ValueError) as exc:
                log.error("pull %s cannot be resumed (%s); it ends failed", run.pull_key, exc)
                self.pulls.end_run(run.pull_key, "failed", f"cannot be resumed: {exc}")
                continue
            resumed += 1
        return resumed

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every pull (each left to resume at the next start)."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    def _run(self, puller: Puller, filters: PullFilter, reprocess: bool) -> None:
        try:
            puller.run(filters, reprocess=reprocess, started_by=STARTED_BY_PAGE, stop=self._stop)
        except PullError as exc:  # recorded on the run by the puller
            log.error("pull from source %s failed: %s", puller.source.name, exc)
        except Exception:  # the boundary of the thread
            log.exception("pull from source %s failed", puller.source.name)
            self.pulls.end_run(filters.key(puller.source.name), "failed", "an unexpected error (see the log)")
