"""The DICOMweb sender: STOW-RS the result objects to a ``protocol: dicomweb`` destination.

``stow_files`` posts all the files of one send in a single ``multipart/related;
type="application/dicom"`` request to ``{url}/studies`` (PS3.18 10.5), its body read from
the files while it is sent (a Content-Length computed from their sizes, never the whole
body in memory), and returns the
HTTP status when the destination stored every instance (200, or 202 with warnings
only; the WarningReason codes are recorded as with a C-STORE warning). Anything else
raises ``SendError``, which names the URL, the failed instances with their
FailureReason in hex and its meaning, and says whether trying again can help
(``permanent``), with the same rules as the DIMSE sender (``dicom_node.send.dimse``):

* permanent (the job fails at once): the credentials are refused (HTTP 401/403, kind
  ``not authorised``); the request is wrong for this server (HTTP 400, 404, 405, 409,
  415 and the other 4xx, or a redirect: the URL is not a STOW-RS endpoint); an
  instance failed with a reason a retry cannot change (0xA9xx, 0xCxxx, ...);
* transient (the job is retried with back-off): no connection, no answer within the
  timeout, the TLS handshake or certificate check fails, the connection drops, HTTP
  5xx, 408 or 429, instances failed only with out of resources (0xA7xx), processing
  failure (0x0110) or resource limitation (0x0213), the auth secret cannot be read
  (a mounted secret may come back), or the answer leaves sent instances unaccounted.

A failed certificate check is transient although an operator must act: the CA file
and the secret are read at every send, so the retry after the fix succeeds without a
restart, and a retry costs nothing. Instance failures win over the HTTP status: a 400
that lists failed instances names them (Orthanc answers 400 when one part is not
understood, yet stores the others).

The answer is DICOM JSON (``Accept: application/dicom+json``), read tolerantly: an
empty body on 200 is taken at its word; a body that lists instances must account for
every instance sent. Orthanc's DICOMweb plugin 1.7 (Debian 12) needs that check: when
storing one part raises inside Orthanc (a Lua ``ReceivedInstanceFilter`` that raises
an error, for example), it answers 200 listing only the instances before it and drops
the rest silently. An instance a filter refuses by returning false is reported as
stored; no STOW-RS client can see that.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import requests
from pydicom.errors import InvalidDicomError

from dicom_node.config import Destination, HttpAuth, without_credentials
from dicom_node.errors import ConfigError, SendError, SendFailure
from dicom_node.send.status import SendOutcome, status_meaning, transient_status

__all__ = ["stow_files", "query_studies"]

log = logging.getLogger(__name__)

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

_TRANSIENT_HTTP = {408, 429}  # request timeout, too many requests; and every 5xx
_CHUNK = 2**20  # bytes of a file read at a time while the request is sent


def stow_files(paths: Sequence[Path], destination: Destination, *, timeout: float) -> SendOutcome:
    """STOW-RS the Part 10 files at ``paths`` in one request; raise ``SendError``
    unless the destination stored every one of them."""
    if destination.protocol != "dicomweb" or not destination.url:
        raise ValueError(f"destination {destination.name} is not a DICOMweb destination")
    if not paths:
        raise ValueError("no files to send")
    peer = destination.peer  # the URL without a user or password (the config refuses them; belt and braces)
    endpoint = destination.url.rstrip("/") + "/studies"
    sizes, sent_uids = _read_headers(paths, peer)
    # 128 random bits: that a file holds the boundary is too unlikely to read them all for
    boundary = secrets.token_hex(16)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if destination.auth is not None:
        headers["Authorization"] = _authorization(destination.auth, peer)
    verify = _verify(destination)
    try:
        response = requests.post(endpoint, data=_MultipartBody(paths, sizes, boundary), headers=headers,
                                 timeout=timeout, verify=verify, allow_redirects=False)
    except requests.RequestException as exc:
        raise _request_failure(exc, peer, without_credentials(endpoint), timeout) from exc
    except _UnreadableFile as exc:
        raise SendError(f"cannot read {exc.path} to send it to {peer}: {exc.reason}", peer=peer) from exc
    return _outcome(response, peer, without_credentials(endpoint), sent_uids, destination.auth)


def _read_headers(paths: Sequence[Path], peer: str) -> tuple[list[int], list[str]]:
    """The files' sizes (for the Content-Length) and SOPInstanceUIDs (to check the answer
    against), read before the request: an unreadable file fails the send before it starts."""
    sizes, uids = [], []
    for path in paths:
        try:
            size = Path(path).stat().st_size
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(header.SOPInstanceUID)
        except OSError as exc:
            raise SendError(f"cannot read {path} to send it to {peer}: {exc}", peer=peer) from exc
        except (InvalidDicomError, AttributeError) as exc:
            raise SendError(f"{path} is not a DICOM Part 10 file with a SOPInstanceUID", peer=peer,
                            permanent=True) from exc
        sizes.append(size)
        uids.append(uid)
    return sizes, uids


class _UnreadableFile(Exception):
    """A file that could not be read while the request was sent (not an ``OSError``, which
    requests would take for a failed connection)."""

    def __init__(self, path: Path, reason: object) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _MultipartBody:
    """The multipart/related body of the files, read from them while requests sends it,
    ``_CHUNK`` bytes at a time; its length is known beforehand, so the request carries a
    Content-Length (not every server takes a chunked upload)."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int], boundary: str) -> None:
        delimiter = b"--" + boundary.encode("ascii")
        self.head = delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n"
        self.tail = delimiter + b"--\r\n"
        self.parts = list(zip(paths, sizes))

    def __len__(self) -> int:
        return sum(len(self.head) + size + 2 for _, size in self.parts) + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        for path, size in self.parts:
            yield self.head
            yield from _file_chunks(path, size)
            yield b"\r\n"
        yield self.tail


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    """The ``size`` bytes of the file, as the Content-Length counted them."""
    try:
        with open(path, "rb") as handle:
            left = size
            while left:
                chunk = handle.read(min(_CHUNK, left))
                if not chunk:
                    raise _UnreadableFile(path, f"it ends {left} bytes short of its size when the send began")
                left -= len(chunk)
                yield chunk
    except OSError as exc:
        raise _UnreadableFile(path, exc) from exc


def _authorization(auth: HttpAuth, peer: str) -> str:
    """The Authorization header's value; the secret is read now, so a rotated one is used."""
    try:
        secret = auth.secret()
    except ConfigError as exc:
        raise SendError(f"cannot send to {peer}: {exc}", peer=peer, kind=SendFailure.LOCAL_ERROR) from exc
    if auth.type == "bearer":
        return f"Bearer {secret}"
    return "Basic " + base64.b64encode(f"{auth.username}:{secret}".encode("utf-8")).decode("ascii")


def _verify(destination: Destination) -> bool | str:
    """What ``requests`` checks the server's certificate against: the destination's CA file,
    or the system's CAs (``verify_tls``, false only with ``allow_insecure``)."""
    return str(destination.ca_certificates) if destination.ca_certificates else destination.verify_tls


def _request_failure(exc: requests.RequestException, peer: str, endpoint: str, timeout: float,
                     request: str = "STOW-RS") -> SendError:
    """A request (``request``: its name in the message) that got no HTTP answer; every such
    failure is transient."""
    if isinstance(exc, requests.exceptions.SSLError):
        return SendError(f"TLS with {peer} failed (tls error): {_innermost(exc)}", peer=peer, kind=SendFailure.TLS_ERROR)
    if isinstance(exc, requests.exceptions.Timeout):  # before ConnectionError: ConnectTimeout is both
        return SendError(f"{peer} did not answer the {request} within {timeout:g} s (timed out)", peer=peer,
                         kind=SendFailure.TIMED_OUT)
    if isinstance(exc, requests.exceptions.ConnectionError):
        if _caused_by(exc, ConnectionRefusedError):
            return SendError(f"{request} to {peer} failed: connection refused (nothing listens there)", peer=peer,
                             kind=SendFailure.CONNECTION_REFUSED)
        if _caused_by(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return SendError(f"{peer} closed the connection during the {request} (aborted by peer)", peer=peer,
                             kind=SendFailure.ABORTED_BY_PEER)
        return SendError(f"{request} to {peer} failed: cannot connect ({_innermost(exc)})", peer=peer,
                         kind=SendFailure.CONNECTION_REFUSED)
    return SendError(f"{request} to {endpoint} failed: {type(exc).__name__}: {without_credentials(str(exc))}",
                     peer=peer)


def _caused_by(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether ``kind`` is among the exceptions that requests and urllib3 wrap in ``exc``."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return True
        stack += [current.__cause__, current.__context__, getattr(current, "reason", None)]
        stack += [arg for arg in current.args if isinstance(arg, BaseException)]
    return False


def _innermost(exc: BaseException) -> str:
    """The deepest reason urllib3 wraps (e.g. the certificate verification message)."""
    while True:
        inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
        inner = inner or getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            return without_credentials(str(exc))
        exc = inner


def _outcome(response: requests.Response, peer: str, endpoint: str, sent_uids: list[str],
             auth: HttpAuth | None) -> SendOutcome:
    http = f"HTTP {response.status_code} {response.reason or ''}".strip()
    if response.status_code in (401, 403):
        if auth is None:
            why = "asks for credentials and the destination has no auth configured"
        else:
            why = f"refused the credentials ({auth.type} auth{f' as user {auth.username}' if auth.username else ''})"
        raise SendError(f"{peer} {why}: {http} (not authorised)", peer=peer, permanent=True, kind=SendFailure.NOT_AUTHORISED)
    answer = _dicom_json(response)
    failed = _failures(answer)
    if failed:
        stored = len(_items(answer, _REFERENCED_SOP_SEQUENCE))
        listed = "; ".join(f"{uid}: 0x{code:04X} ({status_meaning(code)})" if code is not None
                           else f"{uid}: no reason given" for uid, code in failed)
        codes = [code for _, code in failed if code is not None]
        raise SendError(
            f"{peer} did not store {len(failed)} of {len(sent_uids)} instances ({http}, {stored} stored): {listed}",
            peer=peer, status=codes[0] if codes else None,
            permanent=not codes or not all(transient_status(code) for code in codes), kind=SendFailure.FAILURE_STATUS,
        )
    if not 200 <= response.status_code < 300:
        transient = response.status_code >= 500 or response.status_code in _TRANSIENT_HTTP
        what = " (a redirect: is the URL the DICOMweb base?)" if 300 <= response.status_code < 400 else ""
        raise SendError(f"STOW-RS to {endpoint} answered {http}{what}", peer=peer, permanent=not transient,
                        kind=SendFailure.FAILURE_STATUS)
    if answer is not None and (_FAILED_SOP_SEQUENCE in answer or _REFERENCED_SOP_SEQUENCE in answer):
        reported = {_uid(item) for item in _items(answer, _REFERENCED_SOP_SEQUENCE)}
        missing = [uid for uid in sent_uids if uid not in reported]
        if missing:
            raise SendError(
                f"{peer} answered {http} but lists {len(missing)} of {len(sent_uids)} instances neither as stored "
                f"nor as failed: {', '.join(missing)}", peer=peer, kind=SendFailure.FAILURE_STATUS,
            )
    warnings = _warnings(answer)
    log.info("stored %d instances at %s (STOW-RS, %s)", len(sent_uids), peer, http)
    if warnings:
        warning = ", ".join(f"0x{code:04X} ({status_meaning(code)})" for code in sorted(warnings))
        log.warning("%s stored with warning %s: %s", peer, warning,
                    "; ".join(f"{uid}: 0x{code:04X}" for code, uids in sorted(warnings.items()) for uid in uids))
        return SendOutcome(response.status_code, warning)
    return SendOutcome(response.status_code)


def _dicom_json(response: requests.Response) -> dict | None:
    """The answer's DICOM JSON object, or None when there is none (an empty body, XML,
    an HTML error page). Orthanc sends its 4xx answers without a Content-Type."""
    text = response.content.strip()
    if not text.startswith(b"{"):
        return None
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _items(answer: dict | None, tag: str) -> list[dict]:
    element = (answer or {}).get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values or [] if isinstance(item, dict)]


def _first_value(item: dict, tag: str):
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _uid(item: dict) -> str:
    return str(_first_value(item, _REFERENCED_SOP_INSTANCE_UID) or "(no SOPInstanceUID)")


def _code(value) -> int | None:
    """A US value: a number in DICOM JSON; some servers send it as a decimal string."""
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _failures(answer: dict | None) -> list[tuple[str, int | None]]:
    return [(_uid(item), _code(_first_value(item, _FAILURE_REASON))) for item in _items(answer, _FAILED_SOP_SEQUENCE)]


def _warnings(answer: dict | None) -> dict[int, list[str]]:
    """WarningReason code -> the instances it was given for (the study-level one as well)."""
    found: dict[int, list[str]] = {}
    top = _code(_first_value(answer or {}, _WARNING_REASON))
    if top is not None:
        found[top] = []
    for item in _items(answer, _REFERENCED_SOP_SEQUENCE):
        code = _code(_first_value(item, _WARNING_REASON))
        if code is not None:
            found.setdefault(code, []).append(_uid(item))
    return found


def query_studies(destination: Destination, *, timeout: float) -> int:
    """One QIDO-RS request, ``GET {url}/studies?limit=1``, with the destination's credentials
    and TLS settings: that the DICOMweb service answers and takes the credentials
    (``dicom-node echo``, and the node's check at start). The HTTP status (2xx), or
    ``SendError`` as a STOW-RS would fail."""
    if destination.protocol != "dicomweb" or not destination.url:
        raise ValueError(f"destination {destination.name} is not a DICOMweb destination")
    peer = destination.peer
    endpoint = destination.url.rstrip("/") + "/studies"
    headers = {"Accept": "application/dicom+json"}
    if destination.auth is not None:
        headers["Authorization"] = _authorization(destination.auth, peer)
    try:
        response = requests.get(endpoint, params={"limit": "1"}, headers=headers, timeout=timeout,
                                verify=_verify(destination),
                                allow_redirects=False)
    except requests.RequestException as exc:
        raise _request_failure(exc, peer, without_credentials(endpoint), timeout, "QIDO-RS") from exc
    http = f"HTTP {response.status_code}"
    if response.status_code in (401, 403):
        raise SendError(f"{peer} refused the credentials of the QIDO-RS: {http} (not authorised)", peer=peer,
                        permanent=True, kind=SendFailure.NOT_AUTHORISED)
    if not 200 <= response.status_code < 300:
        raise SendError(f"QIDO-RS to {without_credentials(endpoint)} answered {http}", peer=peer,
                        permanent=response.status_code < 500, kind=SendFailure.FAILURE_STATUS)
    return response.status_code
