"""The HTTP endpoint for orchestrators, monitoring and operators: ``/healthz``,
``/readyz``, ``/metrics`` and, when ``http.ui`` is on, the status page.

``/healthz`` (liveness) answers 200 when the SCP listens, the worker thread is alive,
the state store takes a write and the spool's disk has more free space than
``storage.min_free_bytes``; otherwise 503 with the failing parts named. The node also
names each of its threads (``completion``, ``processing``, ``send:<destination>``,
``retention``; the SCP's under ``scp``) and ``stuck``: a model run past its deadline
that is not ending, so that an orchestrator restarts a node whose slot is held.

``/readyz`` (readiness) answers 503 when liveness fails, or while the node cannot do its
work: the state store cannot take writes (``database``: a write refused as full, the
database at its page limit or its disk nearly full), the configured model's weights are
missing (the body names the expected path and how to import them), or a destination has failed its last
``http.unready_after_failed_sends`` sends (the body names it, its peer and the last
error), or a destination has not answered since the node started (``echo:NAME``, from
``dicom_node.send.echo.StartupEchoes``). Both bodies are JSON: ``status``, ``failing`` (part -> what is
wrong), ``checked``.

``/metrics`` is Prometheus' text format. Everything else goes to the status page
(``dicom_node.web.status_page``), or is 404. It listens only on ``http.bind_address``.

Every path answers only for the host names of ``http.allowed_hosts`` (421 for another
``Host``: DNS rebinding), and every response carries a Content-Security-Policy (the
node's own origin only), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
no-referrer`` and ``Cache-Control: no-store``. A client that goes away mid-answer (a
browser leaving the page) is a DEBUG line, never a traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol, Sequence
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from dicom_node.config import Destination
from dicom_node.store.state import StateStore
from dicom_node.web.access import default_hosts, host_allowed

__all__ = ["HealthCheck", "Response", "Pages", "HttpEndpoint", "SECURITY_HEADERS", "disk_check", "destination_check"]

log = logging.getLogger(__name__)

HealthCheck = Callable[[], str | None]  # None when healthy, else what is wrong

_MAX_BODY = 64 * 1024  # request bodies (the page's actions send none or a few bytes)
_REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request or read the answer
# On every response: the page, its script and its style come from the node alone (previews
# are fetched with the token and shown as blob: URLs), nothing frames it, nothing is cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none';"
                                " frame-ancestors 'none'; form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)  # the client went away


class Response(tuple):
    """(status, body, content type, extra headers)."""

    def __new__(cls, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> "Response":
        return super().__new__(cls, (status, body, kind, headers or {}))


class Pages(Protocol):
    """What serves the paths the endpoint does not know itself (the status page)."""

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, client: str) -> Response | None:
        ...


def _json(status: int, body: dict) -> Response:
    return Response(status, (json.dumps(body) + "\n").encode(), "application/json")


class HttpEndpoint:
    def __init__(self, bind_address: str, port: int, checks: dict[str, HealthCheck],
                 metrics: Callable[[], bytes], *, readiness: dict[str, HealthCheck] | None = None,
                 pages: Pages | None = None, allowed_hosts: Sequence[str] | None = None) -> None:
        self.checks = checks
        self.readiness = readiness or {}
        self.metrics = metrics
        self.pages = pages
        self.allowed_hosts = tuple(allowed_hosts) if allowed_hosts is not None else default_hosts(bind_address)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            timeout = _REQUEST_TIMEOUT  # a client that stalls loses its thread, not the endpoint

            def handle(self) -> None:
                try:
                    super().handle()
                except _GONE as exc:  # a browser that left the page: nothing to answer, nothing wrong
                    log.debug("http: client %s went away: %s", self.client_address[0], type(exc).__name__)
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._answer(endpoint.route("GET", self.path, self.headers, self.client_address[0]))

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(endpoint.route("GET", self.path, self.headers, self.client_address[0]), body=False)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    self._answer(Response(413, b"request body too large\n", "text/plain"))
                    return
                self.rfile.read(length)  # nothing the page posts carries meaning in the body
                self._answer(endpoint.route("POST", self.path, self.headers, self.client_address[0]))

            def _answer(self, response: Response, body: bool = True) -> None:
                status, content, kind, headers = response
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                for name, value in {**headers, **SECURITY_HEADERS}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def log_message(self, format: str, *args) -> None:
                log.debug("http: " + format, *args)

        self.bind_address = bind_address
        self._port = port
        self._handler = Handler
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    def route(self, method: str, target: str, headers, client: str = "") -> Response:
        url = urlsplit(target)
        if not host_allowed(headers.get("Host"), self.allowed_hosts):
            log.warning("http: %s %s from %s refused: Host %r is not in http.allowed_hosts", method, url.path,
                        client, (headers.get("Host") or "")[:100])
            return Response(421, b"misdirected request: this node does not answer for that host name"
                                 b" (http.allowed_hosts)\n", "text/plain")
        if method == "GET" and url.path == "/healthz":
            return self.health()
        if method == "GET" and url.path == "/readyz":
            return self.ready()
        if method == "GET" and url.path == "/metrics":
            return Response(200, self.metrics(), CONTENT_TYPE_LATEST)
        if self.pages is not None:
            try:
                response = self.pages.handle(method, url.path, parse_qs(url.query), headers, client)
            except Exception:  # one bad request must not take the endpoint down
                log.exception("http: %s %s failed", method, url.path)
                return Response(500, b"internal error (see the node's log)\n", "text/plain")
            if response is not None:
                return response
        return Response(404, b"not found\n", "text/plain")

    @staticmethod
    def _run(checks: dict[str, HealthCheck]) -> dict[str, str]:
        failing = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that raises is a failing part
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                failing[name] = problem
        return failing

    def health(self) -> Response:
        failing = self._run(self.checks)
        body = {"status": "ok" if not failing else "unhealthy", "failing": failing, "checked": sorted(self.checks)}
        return _json(200 if not failing else 503, body)

    def ready(self) -> Response:
        """Ready: alive, and able to do the work (weights present, the destinations taking results)."""
        checks = {**self.checks, **self.readiness}
        failing = self._run(checks)
        body = {"status": "ready" if not failing else "not ready", "failing": failing, "checked": sorted(checks)}
        return _json(200 if not failing else 503, body)

    def start(self) -> None:
        """Bind and serve. The port is taken here, not at construction, so that the node
        opens its ports in one place and in order; a bind's ``OSError`` propagates."""
        self._server = _Server((self.bind_address, self._port), self._handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        log.info("HTTP health and metrics on %s:%d%s", *self._server.server_address[:2],
                 " (status page at /)" if self.pages is not None else "")

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """An error that escaped a request goes to the node's log (not a bare traceback on
        stderr); a client that went away is a DEBUG line."""
        error = sys.exc_info()[1]
        if isinstance(error, _GONE):
            log.debug("http: client %s went away: %s", client_address[0], type(error).__name__)
        else:
            log.error("http: a request from %s failed", client_address[0], exc_info=True)


def disk_check(path, min_free_bytes: int) -> HealthCheck:
    def check() -> str | None:
        free = shutil.disk_usage(path).free
        return None if free >= min_free_bytes else f"{free} bytes free, below {min_free_bytes}"
    return check


def destination_check(state: StateStore, destinations: Sequence[Destination], failed_sends: int) -> HealthCheck:
    """Failing while some destination's last ``failed_sends`` send attempts (the state
    store's send log) all failed; 0 never fails."""
    def check() -> str | None:
        if failed_sends <= 0:
            return None
        problems = []
        for destination in destinations:
            recent = state.recent_sends(failed_sends, destination.name)
            if len(recent) < failed_sends or any(ok for _, ok, _ in recent):
                continue
            problems.append(f"destination {destination.name} ({destination.peer}) failed its last {failed_sends}"
                            f" send(s); last error: {recent[0][2] or 'unknown'}")
        return "; ".join(problems) or None
    return check
