"""The HTTP endpoint for orchestrators and monitoring: ``/healthz`` and ``/metrics``.

``/healthz`` answers 200 when the SCP listens, the worker thread is alive, the state
store takes a write and the spool's disk has more free space than
``storage.min_free_bytes``; otherwise 503 with the failing parts named. ``/metrics``
is Prometheus' text format. It listens only on ``http.bind_address``.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["HealthCheck", "HttpEndpoint"]

log = logging.getLogger(__name__)

HealthCheck = Callable[[], str | None]  # None when healthy, else what is wrong


class HttpEndpoint:
    def __init__(self, bind_address: str, port: int, checks: dict[str, HealthCheck],
                 metrics: Callable[[], bytes]) -> None:
        self.checks = checks
        self.metrics = metrics
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/healthz":
                    status, body, kind = endpoint.health()
                elif self.path == "/metrics":
                    status, body, kind = 200, endpoint.metrics(), CONTENT_TYPE_LATEST
                else:
                    status, body, kind = 404, b"not found\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                log.debug("http: " + format, *args)

        self.bind_address = bind_address
        self._port = port
        self._handler = Handler
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    def health(self) -> tuple[int, bytes, str]:
        failing = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that raises is a failing part
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                failing[name] = problem
        body = {"status": "ok" if not failing else "unhealthy", "failing": failing,
                "checked": sorted(self.checks)}
        return (200 if not failing else 503), (json.dumps(body) + "\n").encode(), "application/json"

    def start(self) -> None:
        """Bind and serve. The port is taken here, not at construction, so that the node
        opens its ports in one place and in order; a bind's ``OSError`` propagates."""
        self._server = ThreadingHTTPServer((self.bind_address, self._port), self._handler)
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        log.info("HTTP health and metrics on %s:%d", *self._server.server_address[:2])

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None


def disk_check(path, min_free_bytes: int) -> HealthCheck:
    def check() -> str | None:
        free = shutil.disk_usage(path).free
        return None if free >= min_free_bytes else f"{free} bytes free, below {min_free_bytes}"
    return check
