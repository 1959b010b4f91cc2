"""The node's configuration: read once at start into frozen, validated objects.

``load_config(path)`` is the only reader of ``config.yaml``. Unknown keys and bad values
raise ``ConfigError`` naming the key (for example ``node.port``). Relative paths are
taken relative to the config file's folder.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigError
from pipeline.outputs.options import OUTPUT_KINDS, OutputRequest, SegOptions, distinct
from pipeline.routing.rules import Rule, RuleSet
from pipeline.settings import ModelPreset, PipelineSettings

__all__ = [
    "TlsSettings",
    "NodeSettings",
    "Caller",
    "SecuritySettings",
    "Destination",
    "Source",
    "HttpAuth",
    "OUTPUTS",
    "StorageSettings",
    "CompletionSettings",
    "SendSettings",
    "HttpSettings",
    "LoggingSettings",
    "RetentionSettings",
    "ReviewSettings",
    "WorkerSettings",
    "AuditSettings",
    "SyslogSettings",
    "NotifyEvent",
    "Webhook",
    "ModelPreset",
    "DEFAULT_MODEL",
    "Config",
    "load_config",
    "parse_config",
    "url_has_credentials",
    "without_credentials",
]


class _Frozen(BaseModel):
    # hide_input_in_errors: a refused value (a URL with a password) is never echoed by the error's text
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or not value.strip():
        raise ValueError("an AE title is 1 to 16 ASCII characters, without backslash")
    return value


class TlsSettings(_Frozen):
    """DICOM TLS (PS3.15 B.1): PEM certificate and key, and the CA that vouches for peers.

    For a destination, the peer's certificate must be signed by ``ca_certificates`` (the
    system's CAs when there is none) and name the destination's ``host``;
    ``check_hostname: false`` drops the name check (insecure: any certificate that CA
    signed then passes) and needs ``ca_certificates``, a CA of the site's own.
    """

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    check_hostname: bool = True


class NodeSettings(_Frozen):
    """The node's own DICOM identity, listening socket and association bounds."""

    ae_title: str = "DICOMNODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1)
    max_pdu_size: int = Field(65536, ge=4096)
    network_timeout_seconds: float = Field(30.0, gt=0)
    shutdown_seconds: float = Field(20.0, gt=0)  # SIGTERM: the job in hand finishes or is handed back by then
    tls: TlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("tls")
    @classmethod
    def _server_needs_a_certificate(cls, tls: TlsSettings | None) -> TlsSettings | None:
        if tls is not None and (tls.certificate is None or tls.private_key is None):
            raise ValueError("the SCP's TLS needs certificate and private_key")
        if tls is not None and tls.require_client_certificate and tls.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        if tls is not None and not tls.check_hostname:
            raise ValueError("check_hostname is a setting of a destination's tls, not of the SCP's")
        return tls


class Caller(_Frozen):
    """A peer allowed to associate: its calling AE title, optionally bound to a host address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title.strip() == self.ae_title.strip() and (self.host is None or self.host == address)


class SecuritySettings(_Frozen):
    """Who may associate. An unknown caller is rejected (A-ASSOCIATE-RJ) and logged, and
    so is a request addressed to another called AE title than ``node.ae_title``, unless
    ``accept_any_called_ae_title`` (for senders that cannot be configured)."""

    allowed_callers: tuple[Caller, ...] = ()
    accept_any_called_ae_title: bool = False

    def admits(self, ae_title: str, address: str) -> bool:
        return any(caller.admits(ae_title, address) for caller in self.allowed_callers)


OUTPUTS = OUTPUT_KINDS
DEFAULT_MODEL = "default"  # the preset that ``pipeline.model`` of earlier releases becomes
Output = Literal["seg", "rtstruct", "overlay", "report"]


class HttpAuth(_Frozen):
    """Credentials for a DICOMweb destination, read from a file or an environment variable
    (never written in the config itself): ``basic`` (username and password) or ``bearer``
    (a token). They are read at every send, so a rotated token file needs no restart."""

    type: Literal["basic", "bearer"]
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    token_file: Path | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> "HttpAuth":
        if self.type == "basic":
            if not self.username:
                raise ValueError("basic auth needs username")
            if (self.password_file is None) == (self.password_env is None):
                raise ValueError("basic auth needs one of password_file or password_env")
            if self.token_file or self.token_env:
                raise ValueError("basic auth takes a password, not a token")
        else:
            if (self.token_file is None) == (self.token_env is None):
                raise ValueError("bearer auth needs one of token_file or token_env")
            if self.username or self.password_file or self.password_env:
                raise ValueError("bearer auth takes a token, not a username or password")
        return self

    def secret(self) -> str:
        """The password or token; ``ConfigError`` naming the file or variable when it is missing."""
        file = self.password_file or self.token_file
        env = self.password_env or self.token_env
        if file is not None:
            try:
                value = file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the {self.type} auth secret from {file}: {exc}") from exc
            where = str(file)
        else:
            value = os.environ.get(env or "", "").strip()
            where = f"environment variable {env}"
        if not value:
            raise ConfigError(f"the {self.type} auth secret is empty or missing ({where})")
        return value


class Destination(_Frozen):
    """Where results are sent, by which protocol, and which results.

    ``protocol: dimse``: C-STORE to ``ae_title`` at ``host``:``port`` (optional ``tls``).
    ``protocol: dicomweb``: STOW-RS to ``url`` (the DICOMweb base, e.g.
    ``https://pacs.example.org/dicom-web``), with optional ``auth``; TLS certificates are
    verified (against ``ca_certificates`` if given) unless ``verify_tls: false``.
    Credentials in clear (``auth`` over ``http://``) and ``verify_tls: false`` are refused
    unless ``allow_insecure: true`` (the node then warns once at start); a user or
    password inside ``url`` is always refused (it would reach logs and errors).
    ``outputs``: the result objects it receives (``seg``, ``rtstruct``, ``overlay``,
    ``report``); ``segmentation_type`` and ``omit_empty_frames`` shape its SEG.
    """

    name: str = Field("pacs", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    protocol: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: TlsSettings | None = None
    url: str | None = Field(None, pattern=r"^https?://")
    auth: HttpAuth | None = None
    verify_tls: bool = True
    ca_certificates: Path | None = None
    allow_insecure: bool = False
    outputs: tuple[Output, ...] = ("seg",)
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    omit_empty_frames: bool = True
    review: Literal["required", "none"] = "none"  # required: its objects wait for a reviewer (``review``)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        if value is not None and url_has_credentials(value):
            raise ValueError("a user or password inside the URL is refused (it would reach logs and errors);"
                             " give them in auth, with password_file or password_env")
        return value

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(OUTPUTS)}")
        if len(set(value)) != len(value):
            raise ValueError("an output is named twice")
        return value

    @model_validator(mode="after")
    def _protocol_fields(self) -> "Destination":
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        web = {"url": self.url, "auth": self.auth, "ca_certificates": self.ca_certificates}
        if self.protocol == "dimse":
            missing = [key for key, value in dimse.items() if value is None]
            foreign = [key for key, value in web.items() if value is not None]
        else:
            missing = ["url"] if self.url is None else []
            foreign = [key for key, value in {**dimse, "tls": self.tls}.items() if value is not None]
        if missing:
            raise ValueError(f"protocol {self.protocol} needs {', '.join(missing)}")
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a setting of protocol {self.protocol}")
        if self.protocol == "dimse" and self.tls is not None and not self.tls.check_hostname \
                and self.tls.ca_certificates is None:
            raise ValueError("tls.check_hostname false needs tls.ca_certificates: without a name check any"
                             " certificate a public CA signed for any host would pass")
        insecure = self.insecurity
        if insecure and not self.allow_insecure:
            raise ValueError(f"{insecure}: refused unless allow_insecure: true")
        if self.allow_insecure and self.protocol != "dicomweb":
            raise ValueError("allow_insecure: not a setting of protocol dimse")
        return self

    @property
    def insecurity(self) -> str | None:
        """What makes this DICOMweb destination insecure (None: nothing): credentials sent in
        clear, or certificates not verified. Allowed only with ``allow_insecure``."""
        if self.protocol != "dicomweb":
            return None
        problems = []
        if self.auth is not None and str(self.url).lower().startswith("http://"):
            problems.append("auth over http:// sends the credentials in clear (use https://)")
        if not self.verify_tls:
            problems.append("verify_tls false accepts any server's certificate")
        return "; ".join(problems) or None

    @property
    def seg_options(self) -> SegOptions:
        return SegOptions(self.segmentation_type, self.omit_empty_frames)

    @property
    def requests(self) -> tuple[OutputRequest, ...]:
        """The result objects it receives."""
        return tuple(OutputRequest(kind, self.seg_options if kind == "seg" else SegOptions()) for kind in self.outputs)

    @property
    def peer(self) -> str:
        """How logs and errors name it: ``AE@host:port`` or the URL."""
        if self.protocol == "dimse":
            return f"{self.ae_title}@{self.host}:{self.port}"
        return without_credentials(str(self.url))


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class Source(_Frozen):
    """A PACS that ``dicom-node pull`` queries and retrieves from.

    ``protocol: dimse``: C-FIND at study and series level at ``ae_title`` on
    ``host``:``port`` (optional ``tls``, as for destinations), then ``retrieve: get``
    (C-GET: the instances come back over the same association) or ``move`` (C-MOVE to
    the node's own AE title: the PACS must know it, and the running node receives). The
    node calls as ``calling_ae_title`` (default: the node's AE title).
    ``protocol: dicomweb``: QIDO-RS, then WADO-RS, at ``url`` with the keys of a DICOMweb
    destination (``auth``, ``verify_tls``, ``ca_certificates``, ``allow_insecure``).
    ``max_concurrent``: series retrieved at once; ``window``: ``"HH:MM-HH:MM"`` (local
    time, may pass midnight) outside which a pull pauses.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    protocol: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: TlsSettings | None = None
    retrieve: Literal["get", "move"] = "get"
    calling_ae_title: str | None = None
    url: str | None = Field(None, pattern=r"^https?://")
    auth: HttpAuth | None = None
    verify_tls: bool = True
    ca_certificates: Path | None = None
    allow_insecure: bool = False
    max_concurrent: int = Field(1, ge=1, le=16)
    window: str | None = None
    timeout_seconds: float = Field(60.0, gt=0)  # one DIMSE message or HTTP read

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None and (not _WINDOW.match(value) or value[:5] == value[6:]):
            raise ValueError('a window is "HH:MM-HH:MM" (24 h, start and end differ), e.g. "19:00-07:00"')
        return value

    @model_validator(mode="after")
    def _as_destination(self) -> "Source":
        try:
            self.connection
        except ValidationError as exc:  # the protocol's keys, checked as a destination's are
            raise ValueError("; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())) from None
        if self.protocol == "dicomweb" and self.calling_ae_title is not None:
            raise ValueError("calling_ae_title: not a setting of protocol dicomweb")
        return self

    @property
    def connection(self) -> Destination:
        """The source's address, TLS and credentials as a destination's (the send side's
        association, TLS and HTTP helpers take that)."""
        keys = ("protocol", "ae_title", "host", "port", "tls", "url", "auth", "verify_tls", "ca_certificates",
                "allow_insecure")
        return Destination(name=self.name, **{key: getattr(self, key) for key in keys})

    def window_minutes(self) -> tuple[int, int] | None:
        """The window's start and end, in minutes after midnight."""
        match = _WINDOW.match(self.window or "")
        if match is None:
            return None
        hour, minute, end_hour, end_minute = (int(group) for group in match.groups())
        return hour * 60 + minute, end_hour * 60 + end_minute


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def url_has_credentials(url: str) -> bool:
    """Whether a URL carries a user or password (``scheme://user:password@host``)."""
    return bool(_URL_USERINFO.search(url))


def without_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``, for
    whatever a URL may reach: logs, errors, the page."""
    return _URL_USERINFO.sub(r"\1***@", text)


class StorageSettings(_Frozen):
    spool_dir: Path = Path("var/spool")
    state_db: Path = Path("var/state.sqlite3")
    min_free_bytes: int = Field(1_000_000_000, ge=0)
    max_series_instances: int = Field(5000, ge=1)
    # Voxels a job may decode from one series (Rows x Columns of each image of its volume,
    # a multi-frame object with all its frames): 512x512x2000, twice a 512x512x1000
    # series, far above a 240-frame enhanced one; one float32 copy of it is 2 GiB, and a
    # job holds a few at its peak (the model's input). More fails the job before any
    # pixel is decoded.
    max_series_voxels: int = Field(512 * 512 * 2000, ge=1)


class CompletionSettings(_Frozen):
    """When a series counts as complete."""

    stable_seconds: float = Field(30.0, gt=0)
    complete_on_release: bool = True
    # A series known not to be whole (instances refused, a slice count not reached, a gap)
    # waits this long after its last instance for the sender's retry, then fails.
    incomplete_grace_seconds: float = Field(600.0, ge=0)


class SendSettings(_Frozen):
    """Sending results: a failed send stays queued and is retried, per destination and object."""

    max_attempts: int = Field(5, ge=1)
    retry_delay_seconds: float = Field(10.0, ge=0)
    timeout_seconds: float = Field(30.0, gt=0)


class HttpSettings(_Frozen):
    """The health, readiness and metrics endpoint, and the status page; port 0 turns it off.

    ``/readyz`` answers 503 once a destination has failed its last
    ``unready_after_failed_sends`` sends (0: never for that reason). ``ui`` serves the
    status page. Its reads need a token too: the action token (``ui_token_file`` or
    ``ui_token_env``; reads and retry) or the read-only token (``ui_read_token_file`` or
    ``ui_read_token_env``), each at least 16 characters and never written in the config
    itself; ``ui_public_read`` opens the reads explicitly. ``ui_previews: false`` turns
    the previews off. ``allowed_hosts``: the ``Host`` names every path answers for
    (None: the bind address, ``localhost`` and the loopback addresses).
    """

    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    unready_after_failed_sends: int = Field(3, ge=0)
    ui: bool = False
    ui_token: str | None = None  # refused: a secret is not written in the config
    ui_token_file: Path | None = None
    ui_token_env: str | None = Field(None, min_length=1)
    ui_read_token_file: Path | None = None
    ui_read_token_env: str | None = Field(None, min_length=1)
    ui_public_read: bool = False
    ui_previews: bool = True
    allowed_hosts: tuple[str, ...] | None = None

    @field_validator("ui_token")
    @classmethod
    def _no_inline_token(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("a secret is not written in the config: put the token in a file named by"
                             " http.ui_token_file, or in an environment variable named by http.ui_token_env")
        return None

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = tuple(name.strip().lower().strip("[]") for name in value)
        for name in names:
            if not name or any(c in name for c in "/ @\\") or (":" in name and name.count(":") == 1):
                raise ValueError(f"{name!r} is not a host name or address (no scheme, port or path)")
        if not names:
            raise ValueError("give at least one host name (leave the key out for the default)")
        return names

    @model_validator(mode="after")
    def _one_token_source(self) -> "HttpSettings":
        if self.ui_token_file is not None and self.ui_token_env is not None:
            raise ValueError("give ui_token_file or ui_token_env, not both")
        if self.ui_read_token_file is not None and self.ui_read_token_env is not None:
            raise ValueError("give ui_read_token_file or ui_read_token_env, not both")
        if self.port and self.ui and not self.ui_public_read and not self.has_ui_token:
            raise ValueError("the status page (ui: true) is closed to readers without a token: give"
                             " ui_token_file or ui_token_env (reads and actions), ui_read_token_file or"
                             " ui_read_token_env (reads only), or ui_public_read: true")
        return self

    @property
    def has_ui_token(self) -> bool:
        return any(value is not None for value in (self.ui_token_file, self.ui_token_env,
                                                    self.ui_read_token_file, self.ui_read_token_env))


class SyslogSettings(_Frozen):
    """An audit collector: RFC 5424 messages over UDP (RFC 5426) to ``host``:``port``,
    ``facility`` 10 (security/authorization, as IHE ATNA asks) by default."""

    host: str
    port: int = Field(514, ge=1, le=65535)
    facility: int = Field(10, ge=0, le=23)
    app_name: str = Field("dicom-node", pattern=r"^[!-~]{1,48}$")


class AuditSettings(_Frozen):
    """The audit trail (``dicom_node.audit``): JSON lines in ``path`` (None:
    ``audit.jsonl`` beside ``storage.state_db``), and with ``syslog`` the same events to a
    collector. On by default: a trail that must be turned on is missing when it is needed."""

    enabled: bool = True
    path: Path | None = None
    syslog: SyslogSettings | None = None


class NotifyEvent(str, Enum):
    """What a webhook is told of: a job that failed, one whose results wait for a
    reviewer, one whose results were all sent."""

    FAILED = "failed"
    REVIEW = "review"
    SENT = "sent"


class Webhook(_Frozen):
    """One webhook of ``notify``: a JSON notice POSTed to ``url`` when a job reaches one
    of ``events`` (``dicom_node.notify``, README "Notifications").

    Every notice is signed with HMAC-SHA256 under the key in the file ``secret_file`` or
    the environment variable ``secret_env`` (at least 16 characters, read once at start;
    ``secret`` itself is refused: a secret is not written in the config). An ``https://``
    receiver's certificate is verified, against ``ca_certificates`` if given;
    ``verify_tls: false`` is refused unless ``allow_insecure: true``. A notice the
    receiver does not take (no answer within ``timeout_seconds``, 5xx, 408, 429) is tried
    again with back-off for up to ``retry_seconds`` after it was made; another 4xx ends it.
    """

    name: str = Field("webhook", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    url: str = Field(pattern=r"^https?://")
    secret: str | None = None  # refused: a secret is not written in the config
    secret_file: Path | None = None
    secret_env: str | None = Field(None, min_length=1)
    events: tuple[NotifyEvent, ...] = (NotifyEvent.FAILED, NotifyEvent.REVIEW)
    timeout_seconds: float = Field(10.0, gt=0)
    retry_seconds: float = Field(3600.0, ge=0)
    verify_tls: bool = True
    ca_certificates: Path | None = None
    allow_insecure: bool = False

    @field_validator("secret")
    @classmethod
    def _no_inline_secret(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("a secret is not written in the config: put the key in a file named by secret_file,"
                             " or in an environment variable named by secret_env")
        return None

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        if url_has_credentials(value):
            raise ValueError("a user or password inside the URL is refused (it would reach logs and errors)")
        return value

    @field_validator("events")
    @classmethod
    def _some_events(cls, value: tuple[NotifyEvent, ...]) -> tuple[NotifyEvent, ...]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(event.value for event in NotifyEvent)}")
        if len(set(value)) != len(value):
            raise ValueError("an event is named twice")
        return value

    @model_validator(mode="after")
    def _one_secret_and_checked_tls(self) -> "Webhook":
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("give one of secret_file or secret_env: every notice is signed with that key")
        https = self.url.startswith("https://")
        if self.ca_certificates is not None and not https:
            raise ValueError("ca_certificates: only for an https:// url")
        if not self.verify_tls and not self.allow_insecure:
            raise ValueError("verify_tls false accepts any server's certificate: refused unless allow_insecure: true")
        return self

    def key(self) -> bytes:
        """The signing key (``ConfigError`` naming the file or variable when it cannot be
        read, is empty or is shorter than 16 characters)."""
        if self.secret_file is not None:
            try:
                value = self.secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"notify {self.name}: secret_file {self.secret_file} cannot be read"
                                  f" ({exc.strerror or exc})") from exc
            where = f"secret_file {self.secret_file}"
        else:
            value = os.environ.get(self.secret_env or "", "").strip()
            where = f"secret_env: the environment variable {self.secret_env}"
        if len(value) < 16:
            raise ConfigError(f"notify {self.name}: {where} is empty or shorter than 16 characters")
        return value.encode("utf-8")


def _webhooks_named_once(value: tuple[Webhook, ...]) -> tuple[Webhook, ...]:
    names = [webhook.name for webhook in value]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"webhook name {', '.join(twice)} is used twice")
    return value


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class RetentionSettings(_Frozen):
    """When the files of ended jobs (their received series and result objects) are deleted.

    A period per outcome, in days (0: kept, until disk pressure): ``days`` for ``sent``,
    ``skipped_days`` for ``skipped`` and ``no_result`` (most MR traffic: nothing to keep
    it for), ``failed_days`` for ``failed`` (time for an operator to look and retry).
    Superseded and reprocessed jobs go with the job that replaced them. Whatever the
    periods, while the spool's disk has less than ``pressure_free_bytes`` free, the
    oldest ended series go first until it has that much again (None: twice
    ``storage.min_free_bytes``, so that retention frees space before C-STORE refuses at
    ``min_free_bytes``; 0: off). ``interval_seconds``: how often retention runs.
    """

    days: float = Field(0, ge=0)
    skipped_days: float = Field(1, ge=0)
    failed_days: float = Field(30, ge=0)
    pressure_free_bytes: int | None = Field(None, ge=0)
    interval_seconds: float = Field(300.0, gt=0)

    def pressure_bytes(self, min_free_bytes: int) -> int:
        """The free space below which disk pressure deletes ended series (0: never)."""
        return 2 * min_free_bytes if self.pressure_free_bytes is None else self.pressure_free_bytes


class ReviewSettings(_Frozen):
    """Review before sending (a destination with ``review: required``): ``expire_days``
    after its results were made, a job nobody approved or rejected ends ``expired`` and
    its held objects are never sent (0: they wait for ever)."""

    expire_days: float = Field(14, ge=0)


class WorkerSettings(_Frozen):
    """Where the model runs.

    ``embedded`` (the default): one warm model process beside the node, one series at
    a time, nothing else to install. ``celery``: segmentation tasks go over Redis
    (``broker_url``) to ``dicom-node worker`` processes, one per GPU, with up to
    ``max_in_flight`` series at once. A task whose worker was lost is delivered again
    after ``visibility_timeout_seconds`` (longer than the slowest series takes).

    ``slots`` (a worker's own setting; ``dicom-node worker --slots N`` overrides it): how
    many series one worker runs at once. Each slot holds its own warm model process, so
    GPU memory is one model per slot; with 2, one series' pre- and post-processing
    overlaps the other's forward pass on the GPU.

    A broker URL with a password is never written in the config: ``broker_url_file``
    names a file holding the whole URL, ``broker_url_env`` an environment variable; a
    password inside ``broker_url`` itself is refused. ``broker()`` reads it.
    """

    backend: Literal["embedded", "celery"] = "embedded"
    max_in_flight: int = Field(1, ge=1)
    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_url_file: Path | None = None
    broker_url_env: str | None = None
    queue: str = "dicom-node"
    visibility_timeout_seconds: float = Field(600.0, gt=0)
    slots: int = Field(1, ge=1)

    @field_validator("broker_url")
    @classmethod
    def _no_password_in_broker_url(cls, value: str) -> str:
        if url_has_credentials(value):
            raise ValueError("a user or password inside the URL is refused (the config is no place for it); put the"
                             " whole URL in the file broker_url_file names, or in the variable broker_url_env names")
        return value

    @model_validator(mode="after")
    def _embedded_runs_one(self) -> "WorkerSettings":
        if self.backend == "embedded" and self.max_in_flight != 1:
            raise ValueError("the embedded runner processes one series at a time: max_in_flight 1, or backend celery")
        given = [key for key in ("broker_url", "broker_url_file", "broker_url_env") if key in self.model_fields_set]
        if len(given) > 1:
            raise ValueError(f"give one of broker_url, broker_url_file or broker_url_env, not {' and '.join(given)}")
        return self

    def broker(self) -> str:
        """The broker URL, read from ``broker_url_file`` or ``broker_url_env`` when one is
        given (``ConfigError`` naming the key when it cannot be read or is empty)."""
        if self.broker_url_file is not None:
            try:
                value = self.broker_url_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"workers.broker_url_file {self.broker_url_file} cannot be read"
                                  f" ({exc.strerror or exc})") from exc
            where = f"workers.broker_url_file {self.broker_url_file}"
        elif self.broker_url_env is not None:
            value = os.environ.get(self.broker_url_env, "").strip()
            where = f"workers.broker_url_env: the environment variable {self.broker_url_env}"
        else:
            return self.broker_url
        if not value:
            raise ConfigError(f"{where} is empty or missing")
        if not re.match(r"(?i)^rediss?://", value):
            raise ConfigError(f"{where} does not hold a redis:// or rediss:// URL")
        return value


def _named_once(items: tuple, what: str, kind: str) -> tuple:
    """At least one item, and no name twice (``ValueError`` naming the repeated ones)."""
    if not items:
        raise ValueError(f"name at least one {what}")
    names = [item.name for item in items]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{kind} name {', '.join(twice)} is used twice")
    return items


class Config(_Frozen):
    node: NodeSettings = NodeSettings()
    security: SecuritySettings = SecuritySettings()
    destinations: tuple[Destination, ...]
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    send: SendSettings = SendSettings()
    pipeline: PipelineSettings = PipelineSettings()
    models: tuple[ModelPreset, ...] = ()
    rules: tuple[Rule, ...] | None = None
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()
    retention: RetentionSettings = RetentionSettings()
    workers: WorkerSettings = WorkerSettings()
    audit: AuditSettings = AuditSettings()
    notify: tuple[Webhook, ...] = ()  # webhooks (``dicom_node.notify``)
    review: ReviewSettings = ReviewSettings()
    sources: tuple[Source, ...] = ()  # PACS that ``dicom-node pull`` retrieves from

    @model_validator(mode="before")
    @classmethod
    def _earlier_keys(cls, data: Any) -> Any:
        """Keys of earlier releases are still accepted: ``destination`` (one mapping) is
        a list of one destination named ``pacs``; ``pipeline.model`` (one model) is a
        ``models`` list of one preset named ``default``."""
        if not isinstance(data, dict):
            return data
        if "destination" in data:
            if "destinations" in data:
                raise ValueError("give destinations (a list) or destination (one, as before), not both")
            data = {**data, "destinations": [data["destination"]]}
            del data["destination"]
        pipeline = data.get("pipeline")
        if isinstance(pipeline, dict) and "model" in pipeline:
            if "models" in data:
                raise ValueError("give models (a list of presets) or pipeline.model (one model, as before), not both")
            model = pipeline["model"]
            data = {**data, "pipeline": {k: v for k, v in pipeline.items() if k != "model"},
                    "models": [{"name": DEFAULT_MODEL, **(model if isinstance(model, dict) else {})}]}
        elif "models" not in data:
            data = {**data, "models": [{"name": DEFAULT_MODEL}]}
        return data

    @model_validator(mode="after")
    def _pressure_above_min_free(self) -> "Config":
        """Disk pressure must start before C-STORE refuses, or it would only ever run on a full disk."""
        mark = self.retention.pressure_free_bytes
        if mark and mark < self.storage.min_free_bytes:
            raise ValueError(f"retention.pressure_free_bytes ({mark}) must be at least storage.min_free_bytes"
                             f" ({self.storage.min_free_bytes}), or 0 to turn disk pressure off")
        return self

    @field_validator("models")
    @classmethod
    def _models_named_once(cls, value: tuple[ModelPreset, ...]) -> tuple[ModelPreset, ...]:
        return _named_once(value, "model preset", "model")

    @field_validator("rules")
    @classmethod
    def _rules_named_once(cls, value: tuple[Rule, ...] | None) -> tuple[Rule, ...] | None:
        if value is not None:
            RuleSet(rules=value)  # unique names
        return value

    @property
    def ruleset(self) -> RuleSet | None:
        """The routing rules; None when the config has none (every model, every destination)."""
        return None if self.rules is None else RuleSet(rules=self.rules)

    def preset(self, name: str) -> ModelPreset:
        """The model preset called ``name`` (``KeyError`` when there is none)."""
        for preset in self.models:
            if preset.name == name:
                return preset
        raise KeyError(name)

    def pipeline_for(self, name: str) -> PipelineSettings:
        """The pipeline settings with the preset's model and policy."""
        return self.pipeline.for_preset(self.preset(name))

    def result_key(self, preset: str, request: OutputRequest) -> str:
        """An object's name in its job and the outbox: ``seg``, ``rtstruct``, ... with one
        model preset; ``PRESET.seg`` and so on when the config names several."""
        return request.key if len(self.models) == 1 else f"{preset}.{request.key}"

    def preset_marks(self, name: str) -> dict[str, Any]:
        """How the objects of preset ``name`` tell their model apart when the config names
        several: the preset in their SeriesDescription, and SeriesNumbers 10 apart per
        preset (in the order of ``models``). Nothing with one preset. Keyword arguments
        of ``pipeline.process.process_series``."""
        if len(self.models) == 1:
            return {}
        index = [preset.name for preset in self.models].index(name)
        return {"preset": name, "series_number_offset": 10 * index}

    @field_validator("destinations")
    @classmethod
    def _destinations_named_once(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        return _named_once(value, "destination", "destination")

    _notify = field_validator("notify")(_webhooks_named_once)

    @field_validator("sources")
    @classmethod
    def _sources_named_once(cls, value: tuple[Source, ...]) -> tuple[Source, ...]:
        return _named_once(value, "source", "source") if value else value

    def source(self, name: str) -> Source:
        """The source called ``name`` (``KeyError`` when there is none)."""
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)

    @property
    def output_requests(self) -> list[OutputRequest]:
        """Every result object some destination receives, each once."""
        return distinct(request for destination in self.destinations for request in destination.requests)

    def destination(self, name: str) -> Destination:
        """The destination called ``name`` (``KeyError`` when there is none)."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)


def _resolve_paths(config: Config, base: Path) -> Config:
    def absolute(path: Path) -> Path:
        return path if path.is_absolute() else (base / path).resolve()

    storage = config.storage.model_copy(
        update={
            "spool_dir": absolute(config.storage.spool_dir),
            "state_db": absolute(config.storage.state_db),
        }
    )
    models = tuple(
        preset.model_copy(update={"weights_dir": absolute(preset.weights_dir), "home_dir": absolute(preset.home_dir)})
        for preset in config.models
    )

    def tls(settings: TlsSettings | None) -> TlsSettings | None:
        if settings is None:
            return None
        return settings.model_copy(
            update={
                key: absolute(getattr(settings, key))
                for key in ("certificate", "private_key", "ca_certificates")
                if getattr(settings, key) is not None
            }
        )

    def auth(settings: HttpAuth | None) -> HttpAuth | None:
        if settings is None:
            return None
        return settings.model_copy(update={
            key: absolute(getattr(settings, key)) for key in ("password_file", "token_file")
            if getattr(settings, key) is not None
        })

    node = config.node.model_copy(update={"tls": tls(config.node.tls)})
    destinations = tuple(
        destination.model_copy(update={
            "tls": tls(destination.tls),
            "auth": auth(destination.auth),
            "ca_certificates": None if destination.ca_certificates is None else absolute(destination.ca_certificates),
        })
        for destination in config.destinations
    )
    sources = tuple(
        source.model_copy(update={
            "tls": tls(source.tls),
            "auth": auth(source.auth),
            "ca_certificates": None if source.ca_certificates is None else absolute(source.ca_certificates),
        })
        for source in config.sources
    )
    http = config.http.model_copy(update={
        key: absolute(getattr(config.http, key)) for key in ("ui_token_file", "ui_read_token_file")
        if getattr(config.http, key) is not None
    })
    broker_file = config.workers.broker_url_file
    workers = config.workers.model_copy(update={"broker_url_file": None if broker_file is None else absolute(broker_file)})
    audit_path = config.audit.path
    audit = config.audit.model_copy(update={  # default: beside the state database
        "path": storage.state_db.parent / "audit.jsonl" if audit_path is None else absolute(audit_path)})
    notify = tuple(webhook.model_copy(update={
        key: absolute(getattr(webhook, key)) for key in ("secret_file", "ca_certificates")
        if getattr(webhook, key) is not None
    }) for webhook in config.notify)
    return config.model_copy(
        update={"node": node, "destinations": destinations, "storage": storage, "models": models, "http": http,
                "workers": workers, "audit": audit, "notify": notify,
                "sources": sources}
    )


def _key_name(loc: tuple) -> str:
    """A pydantic error location as the README writes keys: ``destinations[0].outputs[1]``
    (list items by their index, counted from 0 like ``rules[N]`` in the rules' messages)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif str(part) and not str(part).startswith(("function-", "tagged-union", "union[")):
            name += f".{part}" if name else str(part)
    return name


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside Optional, a tuple or a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        model = _model_in(argument)
        if model is not None:
            return model
    return None


def _did_you_mean(loc: tuple) -> str:
    """``"; did you mean stable_seconds?"`` for an unknown key close to one the section has."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field is not None else None
    if model is None or not loc:
        return ""
    known = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def parse_config(data: Any, base: Path, source: str = "config") -> Config:
    """Validate a mapping (as read from YAML) into a ``Config``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = _key_name(error["loc"]) or "(top level)"
            if error["type"] == "extra_forbidden":
                message = "unknown key" + _did_you_mean(error["loc"])
            else:
                message = error["msg"]
            problems.append(f"{key}: {message}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from exc
    if config.ruleset is not None:
        try:
            config.ruleset.check_references([m.name for m in config.models], [d.name for d in config.destinations])
        except ValueError as exc:
            raise ConfigError(f"{source}: " + str(exc).replace("\n", "; ")) from exc
    return _resolve_paths(config, base)


def load_config(path: Path) -> Config:
    """Read and validate the YAML config at ``path``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, path.parent.resolve(), str(path))
