"""Who may ask the HTTP endpoint, and what: the ``Host`` names it answers for, the status
page's tokens, and the slowdown of a client that guesses tokens.

* ``host_allowed``: a request whose ``Host`` names another host than ``http.allowed_hosts``
  (by default the bind address, ``localhost`` and the loopback addresses) is refused, on
  every path, so that a page bound to 127.0.0.1 cannot be read through DNS rebinding.
* ``PageTokens``: the action token (``http.ui_token_file`` or ``http.ui_token_env``: reads
  and actions), the read-only token (``http.ui_read_token_file`` or ``_env``: reads only)
  and ``http.ui_public_read`` (reads without a token).
* ``Gate.check``: one request's ``Authorization: Bearer TOKEN`` against them; a wrong
  token is logged with the client's address (never the token) and counted per client by
  ``Throttle``: after ``free_failures`` wrong tokens the client gets 429 with
  ``Retry-After``, for a time that doubles with each further wrong token.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Need", "PageTokens", "Refusal", "Throttle", "Gate", "host_allowed", "default_hosts"]

log = logging.getLogger(__name__)

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def default_hosts(bind_address: str) -> tuple[str, ...]:
    """The host names a node answers for when ``http.allowed_hosts`` is not set: its bind
    address, ``localhost`` and the loopback addresses (a local probe or a port published
    on 127.0.0.1 reaches a node bound to 0.0.0.0 under those)."""
    return tuple(dict.fromkeys((bind_address.lower(), *_LOOPBACK)))


def _host_name(header: str) -> str | None:
    """The host of a ``Host`` header without its port (``[::1]:8080`` -> ``::1``); None
    when it is no host name at all."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return value[1:end]
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request's ``Host`` header names one of ``allowed`` (any port). A request
    without one (HTTP/1.0) is refused: every browser and probe sends it."""
    if not header:
        return False
    name = _host_name(header)
    if name is None:
        return False
    names = {entry.lower().strip("[]").rstrip(".") for entry in allowed}
    if name in names:
        return True
    try:  # 127.0.0.1 and 127.000.000.001, ::1 and 0:0::1 are one address
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    for entry in names:
        try:
            if ipaddress.ip_address(entry) == address:
                return True
        except ValueError:
            continue
    return False


class Need(enum.Enum):
    READ = "read"
    ACT = "act"


@dataclass(frozen=True)
class PageTokens:
    """The status page's secrets, read at start. ``action``: reads and actions; ``read``:
    reads only; ``public_read``: reads need no token."""

    action: str | None = None
    read: str | None = None
    public_read: bool = False

    def __post_init__(self) -> None:
        if self.action is not None and self.action == self.read:
            raise ValueError("the read-only token and the action token must differ")

    def __repr__(self) -> str:  # never a token in a log line or a traceback
        return (f"PageTokens(action={'set' if self.action else None}, read={'set' if self.read else None},"
                f" public_read={self.public_read})")


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the HTTP status, the error shown, extra headers."""

    status: int
    error: str
    headers: Mapping[str, str]


@dataclass
class _Client:
    failures: int = 0
    last_failure: float = 0.0
    blocked_until: float = 0.0
    told: bool = False  # the current block was logged


class Throttle:
    """Wrong tokens per client address. The first ``free_failures`` cost nothing; each one
    after blocks the client for ``first_block_seconds``, doubled per further wrong token,
    at most ``max_block_seconds``. A client forgets its failures after
    ``forget_seconds`` without one, or on a right token. At most ``max_clients`` are
    remembered (the oldest go first), so that a flood of addresses cannot fill memory."""

    def __init__(self, free_failures: int = 5, first_block_seconds: float = 2.0,
                 max_block_seconds: float = 600.0, forget_seconds: float = 900.0,
                 max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures = free_failures
        self.first_block_seconds = first_block_seconds
        self.max_block_seconds = max_block_seconds
        self.forget_seconds = forget_seconds
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def _client(self, address: str, now: float) -> _Client | None:
        client = self._clients.get(address)
        if client is not None and now - client.last_failure > max(self.forget_seconds, client.blocked_until - now):
            del self._clients[address]
            return None
        return client

    def blocked(self, address: str) -> float:
        """Seconds until ``address`` may try a token again (0: now)."""
        with self._lock:
            now = self._clock()
            client = self._client(address, now)
            return 0.0 if client is None else max(0.0, client.blocked_until - now)

    def first_refusal(self, address: str) -> bool:
        """True once per block: whether this refusal of a blocked client is the first (to log)."""
        with self._lock:
            client = self._clients.get(address)
            if client is None or client.told:
                return False
            client.told = True
            return True

    def failure(self, address: str) -> tuple[int, float]:
        """Count a wrong token: (wrong tokens in a row, seconds the client is now blocked)."""
        with self._lock:
            now = self._clock()
            client = self._client(address, now) or _Client()
            client.failures += 1
            client.last_failure = now
            block = 0.0
            if client.failures >= self.free_failures:
                exponent = client.failures - self.free_failures
                block = min(self.max_block_seconds, self.first_block_seconds * 2 ** min(exponent, 32))
                client.blocked_until = now + block
                client.told = False
            self._clients[address] = client
            self._clients.move_to_end(address)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return client.failures, block

    def success(self, address: str) -> None:
        with self._lock:
            self._clients.pop(address, None)


def _bearer(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``; "" for another scheme; None without one."""
    given = (headers.get("Authorization") or "").strip()
    if not given:
        return None
    scheme, _, token = given.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _same(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


class Gate:
    """The status page's door: ``check`` says whether a request may read or act."""

    def __init__(self, tokens: PageTokens, throttle: Throttle | None = None) -> None:
        self.tokens = tokens
        self.throttle = throttle or Throttle()

    @property
    def actions(self) -> bool:
        """Whether any token can act (an action token is configured)."""
        return self.tokens.action is not None

    def can_act(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries the action token (no count, no log: for display)."""
        token = _bearer(headers)
        return bool(token) and _same(token, self.tokens.action)

    def check(self, headers: Mapping[str, str], client: str, need: Need, what: str) -> Refusal | None:
        """None when the request may do ``need``; else why not. ``what`` (the method and
        path) and ``client`` (its address) name a refusal in the log."""
        tokens = self.tokens
        if need is Need.READ and tokens.public_read:
            return None
        if need is Need.ACT and tokens.action is None:
            return Refusal(403, "actions are off: no http.ui_token_file or http.ui_token_env configured", {})
        if need is Need.READ and tokens.action is None and tokens.read is None:
            return Refusal(403, "reads are closed: no token configured and http.ui_public_read is false", {})
        wait = self.throttle.blocked(client)
        if wait > 0:
            if self.throttle.first_refusal(client):
                log.warning("status page: client %s is held back for %d s after repeated wrong tokens",
                            client, math.ceil(wait))
            return Refusal(429, f"too many wrong tokens: try again in {math.ceil(wait)} s",
                           {"Retry-After": str(math.ceil(wait))})
        token = _bearer(headers)
        if token is None:
            return Refusal(401, "this needs the token (Authorization: Bearer TOKEN)",
                           {"WWW-Authenticate": 'Bearer realm="dicom-node"'})
        acts = _same(token, tokens.action)
        reads = acts or _same(token, tokens.read)
        if not reads:
            failures, block = self.throttle.failure(client)
            log.warning("status page: wrong token from %s for %s (%d in a row%s)", client, what, failures,
                        f"; held back {math.ceil(block)} s" if block else "")
            return Refusal(403, "wrong token", {})
        self.throttle.success(client)
        if need is Need.ACT and not acts:
            return Refusal(403, "the read-only token cannot do actions", {})
        return None
