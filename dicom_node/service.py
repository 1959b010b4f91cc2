"""The running node: wires spool, state, completion, worker, SCP and HTTP together, in one place."""

from __future__ import annotations

import logging
import signal
import threading

from dicom_node.completion import Completion
from dicom_node.config import Config
from dicom_node.handoff import InProcessQueue
from dicom_node.http import HttpEndpoint, disk_check
from dicom_node.metrics import Metrics
from dicom_node.retention import expired, purge
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.state import StateStore
from dicom_node.worker import Worker
from pipeline.errors import WeightsMissingError
from pipeline.segment import Segmenter, make_segmenter

__all__ = ["Node", "serve"]

log = logging.getLogger(__name__)

_RETENTION_INTERVAL = 3600.0


class Node:
    def __init__(self, config: Config, segmenter: Segmenter | None = None) -> None:
        self.config = config
        self.spool = Spool(config.storage.spool_dir)
        self.state = StateStore(config.storage.state_db)
        self.metrics = Metrics(self.state)
        self.segmenter = segmenter or make_segmenter(config.pipeline.model)
        worker = Worker(config, self.state, self.spool, self.segmenter, self.metrics)
        self.queue = InProcessQueue(self.state, worker)
        self.completion = Completion(config.completion, self.state, self.queue.submit)
        self.scp = StorageSCP(
            config.node, config.security, config.storage, self.spool, self.state, self.completion, self.metrics
        )
        self.http: HttpEndpoint | None = None
        if config.http.port:
            self.http = HttpEndpoint(
                config.http.bind_address,
                config.http.port,
                {
                    "scp": lambda: None if self.scp.listening else "the DICOM SCP is not listening",
                    "worker": lambda: None if self.queue.alive else "the worker thread is not running",
                    "state_store": self._state_store_check,
                    "disk": disk_check(self.spool.root, config.storage.min_free_bytes),
                },
                self.metrics.exposition,
            )
        self._stop = threading.Event()
        self._retention = threading.Thread(target=self._retention_loop, name="retention", daemon=True)

    def _state_store_check(self) -> str | None:
        self.state.check_writable()
        return None

    def start(self) -> None:
        resumed = self.state.resume_interrupted()
        restarted = self.state.restart_completion_timers()
        if resumed or restarted:
            log.info("resuming: %d interrupted job(s), %d series still receiving", resumed, restarted)
        self._report_weights()
        if not self.config.security.allowed_callers:
            log.warning("security.allowed_callers is empty: every association will be rejected")
        self.queue.start()
        self.completion.start()
        self.scp.start()
        if self.http is not None:
            self.http.start()
        if self.config.retention.days > 0:
            self._retention.start()

    def stop(self) -> None:
        log.info("stopping")
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        self.scp.stop()
        self.completion.stop()
        self.queue.stop()
        self.state.close()

    def _retention_loop(self) -> None:
        while not self._stop.is_set():
            try:
                purge(self.state, expired(self.state, self.config.retention.days))
            except Exception:
                log.exception("retention run failed")
            self._stop.wait(_RETENTION_INTERVAL)

    def _report_weights(self) -> None:
        check = getattr(self.segmenter, "check_weights", None)
        if check is None:
            return
        try:
            check()
            log.info("model weights present for %s", self.segmenter.describe())
        except WeightsMissingError as exc:
            log.error("%s", exc)


def serve(config: Config) -> None:
    """Run the node until SIGTERM or SIGINT."""
    node = Node(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()
