"""A webhook receiver: an HTTP server on 127.0.0.1 that records every POST (its headers
and body, in arrival order) and answers with the statuses a test gives, then 200."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_until

__all__ = ["Received", "WebhookReceiver", "signature_of"]


def signature_of(key: bytes, timestamp: str, body: bytes) -> str:
    """What the signature header must hold, computed here from the README's description
    (not with the node's own ``sign``): HMAC-SHA256 of the timestamp, ``.``, the body."""
    return "sha256=" + hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Received:
    """One POST as it arrived."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def signed_by(self, key: bytes) -> bool:
        expected = signature_of(key, self.headers.get("x-dicom-node-timestamp", ""), self.body)
        return hmac.compare_digest(expected, self.headers.get("x-dicom-node-signature", ""))


class WebhookReceiver:
    """``start`` listens on ``port`` (a free one unless given: a test may reserve the port,
    point the node at it and start the receiver later)."""

    def __init__(self, port: int | None = None, statuses: Iterable[int] = ()) -> None:
        self.port = port or free_port()
        self._statuses = list(statuses)
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}/hook"

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver._received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                       body))
                    status = receiver._statuses.pop(0) if receiver._statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer((LOCALHOST, self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """At least ``count`` POSTs received (all of them returned)."""
        return wait_until(lambda: (lambda got: got if len(got) >= count else None)(self.received), timeout, 0.05,
                          f"{count} webhook POST(s) at {self.url}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
