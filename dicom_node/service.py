"""The running node: wires spool, state, completion, worker, SCP and HTTP together, in one place.

Start-up checks what the configuration names before anything runs or any job is
touched: the ports must be free to listen on (a second copy of the node on the same
state store stops here), the TLS files readable and the storage folders writable. A
failure is a ``StartupError`` naming the config key and its value. The SCP opens last,
so a node whose DICOM port accepts is whole; a part that fails later stops the parts
already started again.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import signal
import socket
import threading
from enum import Enum
from pathlib import Path
from typing import Callable

from dicom_node.audit import Audit
from dicom_node.config import Config, ModelPreset, TlsSettings
from dicom_node.errors import ConfigError, NodeError
from dicom_node.metrics import Metrics
from dicom_node.notify import Notifier
from dicom_node.pull.runner import PullRunner
from dicom_node.receive.completion import Completion
from dicom_node.receive.scp import StorageSCP
from dicom_node.send.echo import StartupEchoes
from dicom_node.store.retention import Retention
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, StateStore
from dicom_node.web.access import PageTokens
from dicom_node.web.http import HttpEndpoint, destination_check, disk_check
from dicom_node.web.status_page import StatusPage
from dicom_node.work.processor import Processor
from dicom_node.work.queue import InProcessQueue
from dicom_node.work.review import Reviews
from pipeline.errors import WeightsMissingError
from pipeline.model.runner import ModelRunner
from pipeline.model.segment import Segmenter, make_segmenter
from pipeline.model.types import ModelService

__all__ = ["StartupProblem", "StartupError", "check_startup", "Node", "model_service", "serve"]

log = logging.getLogger(__name__)

# how far past its deadline a model run counts as stuck: the runner stops a model at its
# deadline within a moment, so a run still going past this did not stop (SIGTERM ignored)
_STUCK_MARGIN_SECONDS = 2.0


class StartupProblem(Enum):
    """Why the node could not start; the CLI gives each its own exit status."""

    PORT_IN_USE = "port in use"
    PORT_NOT_PERMITTED = "port not permitted"
    CANNOT_LISTEN = "cannot listen"
    FILE_UNREADABLE = "file unreadable"
    FOLDER_UNWRITABLE = "folder unwritable"


class StartupError(NodeError):
    """A port, file or folder that the configuration names cannot be used.

    The message is one line that starts with the config key and its value, for example
    ``node.port 11112 on 127.0.0.1 is already in use``.
    """

    def __init__(self, message: str, *, key: str, value: object, problem: StartupProblem) -> None:
        super().__init__(message)
        self.key = key
        self.value = value
        self.problem = problem


def _listen_error(exc: OSError, section: str, address: str, port: int) -> StartupError:
    key = f"{section}.port"
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{section}.bind_address {address} is not an address of this host ({exc.strerror})",
                            key=f"{section}.bind_address", value=address, problem=StartupProblem.CANNOT_LISTEN)
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{key} {port} on {address} is already in use",
                            key=key, value=port, problem=StartupProblem.PORT_IN_USE)
    if exc.errno == errno.EACCES:
        hint = (" (a port below 1024 needs root or CAP_NET_BIND_SERVICE; or choose a port above 1023)"
                if port < 1024 else f" ({exc.strerror})")
        return StartupError(f"{key} {port} on {address} is not permitted{hint}",
                            key=key, value=port, problem=StartupProblem.PORT_NOT_PERMITTED)
    return StartupError(f"{key} {port} on {address}: cannot listen ({exc.strerror or exc})",
                        key=key, value=port, problem=StartupProblem.CANNOT_LISTEN)


def _check_port(section: str, address: str, port: int) -> None:
    """Bind and close at once, as the server will bind (SO_REUSEADDR), so that a port
    that cannot be opened is found before anything starts."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise _listen_error(exc, section, address, port) from exc


def _check_readable(key: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{key} {path} cannot be read ({exc.strerror})",
                           key=key, value=path, problem=StartupProblem.FILE_UNREADABLE) from exc


def _check_writable_folder(key: str, folder: Path, shown: Path | None = None) -> None:
    """``folder`` exists and is writable, or can be created (its nearest existing
    ancestor is writable). Nothing is written."""
    shown = shown or folder
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"is not a folder ({existing} is a file)" if existing != folder else "is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing == folder else f"cannot be created ({existing} is not writable)"
    if problem:
        raise StartupError(f"{key} {shown} {problem}", key=key, value=shown, problem=StartupProblem.FOLDER_UNWRITABLE)


def check_startup(config: Config) -> None:
    """Raise ``StartupError`` for the first port that cannot be listened on, TLS file
    that cannot be read or storage folder that cannot be written."""
    _check_port("node", config.node.bind_address, config.node.port)
    if config.http.port:
        _check_port("http", config.http.bind_address, config.http.port)
    tls_sections: tuple[tuple[str, TlsSettings | None], ...] = (
        ("node.tls", config.node.tls),
        *((f"destinations[{n}].tls", d.tls) for n, d in enumerate(config.destinations)),
    )
    for section, tls in tls_sections:
        if tls is None:
            continue
        for name in ("certificate", "private_key", "ca_certificates"):
            path = getattr(tls, name)
            if path is not None:
                _check_readable(f"{section}.{name}", path)
    for n, destination in enumerate(config.destinations):
        if destination.ca_certificates is not None:
            _check_readable(f"destinations[{n}].ca_certificates", destination.ca_certificates)
        if destination.auth is not None:
            try:
                destination.auth.secret()
            except ConfigError as exc:
                where = destination.auth.password_file or destination.auth.token_file
                raise StartupError(f"destinations[{n}].auth ({destination.name}): {exc}", key=f"destinations[{n}].auth",
                                   value=where, problem=StartupProblem.FILE_UNREADABLE) from exc
    if config.http.port and config.http.ui:
        for key in ("ui_token_file", "ui_read_token_file"):
            if getattr(config.http, key) is not None:
                _check_readable(f"http.{key}", getattr(config.http, key))
        for key in ("ui_token_env", "ui_read_token_env"):
            name = getattr(config.http, key)
            if name is not None and not os.environ.get(name, "").strip():
                raise StartupError(f"http.{key} {name}: the environment variable is not set or empty",
                                   key=f"http.{key}", value=name, problem=StartupProblem.FILE_UNREADABLE)
    if config.workers.backend == "celery":
        try:
            config.workers.broker()
        except ConfigError as exc:
            key = "workers.broker_url_file" if config.workers.broker_url_file else "workers.broker_url_env"
            raise StartupError(str(exc), key=key, value=config.workers.broker_url_file or config.workers.broker_url_env,
                               problem=StartupProblem.FILE_UNREADABLE) from exc
    for n, webhook in enumerate(config.notify):
        if webhook.ca_certificates is not None:
            _check_readable(f"notify[{n}].ca_certificates", webhook.ca_certificates)
        try:
            webhook.key()
        except ConfigError as exc:
            key = f"notify[{n}].secret_file" if webhook.secret_file is not None else f"notify[{n}].secret_env"
            raise StartupError(f"{key}: {exc}", key=key, value=webhook.secret_file or webhook.secret_env,
                               problem=StartupProblem.FILE_UNREADABLE) from exc
    spool = config.storage.spool_dir
    _check_writable_folder("storage.spool_dir", spool)
    for sub in ("incoming", "results", "tmp"):
        if (spool / sub).exists():
            _check_writable_folder("storage.spool_dir", spool / sub, shown=spool)
    db = config.storage.state_db
    _check_writable_folder("storage.state_db", db.parent, shown=db)
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise StartupError(f"storage.state_db {db} is not writable",
                           key="storage.state_db", value=db, problem=StartupProblem.FOLDER_UNWRITABLE)
    audit = config.audit.path
    if config.audit.enabled and audit is not None:
        if audit.exists() and (audit.is_dir() or not os.access(audit, os.W_OK)):
            raise StartupError(f"audit.path {audit} is not a writable file",
                               key="audit.path", value=audit, problem=StartupProblem.FOLDER_UNWRITABLE)
        if not audit.exists():
            _check_writable_folder("audit.path", audit.parent, shown=audit)


class Node:
    def __init__(self, config: Config, segmenter: Segmenter | None = None) -> None:
        check_startup(config)
        self.config = config
        self.spool = Spool(config.storage.spool_dir)
        self.state = StateStore(config.storage.state_db)
        self.metrics = Metrics(self.state)
        self.audit = Audit(config.audit, ae_title=config.node.ae_title) if config.audit.enabled else Audit.off()
        self.notifier = Notifier(config.notify, ae_title=config.node.ae_title, metrics=self.metrics)
        self.models: dict[str, ModelService] = {}  # by preset name
        segmenters: Segmenter | dict[str, Segmenter] | None = segmenter
        if segmenters is None:
            self.models = {preset.name: model_service(config, preset) for preset in config.models}
            segmenters = {name: make_segmenter(config.preset(name).settings, service)
                          for name, service in self.models.items()}
            self.metrics.worker_queue_depth = getattr(next(iter(self.models.values())), "queue_depth", None)
        processor = Processor(config, self.state, self.spool, segmenters, self.metrics, self.audit,
                              notifier=self.notifier)
        self.segmenters = processor.segmenters  # by preset name
        self.queue = InProcessQueue(self.state, processor, processing_slots=config.workers.max_in_flight,
                                    destinations=tuple(d.name for d in config.destinations))
        # review decisions (page and timer): outcomes through audit_end, approved sends woken at once
        self.reviews = Reviews(self.state, audit=self.audit, ended=processor.audit_end, wake=self.queue.submit)
        self.completion = Completion(config.completion, self.state, self.queue.submit,
                                     on_incomplete=functools.partial(self._incomplete, processor))
        self.scp = StorageSCP(
            config.node, config.security, config.storage, self.spool, self.state, self.completion, self.metrics,
            self.audit,
        )
        # pulls started from the status page, run by the node itself (resumed at start)
        self.pulls = PullRunner(config, self.state, self.spool, metrics=self.metrics,
                                audit=self.audit) if config.sources else None
        # each destination checked at start (C-ECHO or QIDO-RS), in the background, until it answered once
        self.echoes = StartupEchoes(config.destinations, calling_ae_title=config.node.ae_title,
                                    timeout=config.send.timeout_seconds, answered_by_send=self._sent_to)
        self.http: HttpEndpoint | None = None
        if config.http.port:
            self.http = HttpEndpoint(
                config.http.bind_address,
                config.http.port,
                {
                    "scp": self._scp_problem,
                    "worker": lambda: None if self.queue.alive else "a processing or send thread is not running",
                    "state_store": self._state_store_check,
                    "disk": disk_check(self.spool.root, config.storage.min_free_bytes),
                    # every thread, by name, and a model run past its deadline
                    "completion": lambda: None if self.completion.alive else "the completion thread is not running",
                    "processing": self.queue.processing_problem,
                    **{f"send:{d.name}": functools.partial(self.queue.sender_problem, d.name)
                       for d in config.destinations},
                    "retention": self._retention_problem,
                    "notify": lambda: None if self.notifier.alive else "the notify thread is not running",
                    "stuck": self._stuck_problem,
                },
                self.metrics.exposition,
                readiness={
                    "database": self.state.write_problem,
                    "weights": self._weights_problem,
                    "audit": self.audit.problem,
                    "destination": destination_check(self.state, config.destinations,
                                                     config.http.unready_after_failed_sends),
                    **{f"echo:{d.name}": functools.partial(self.echoes.problem, d.name) for d in config.destinations},
                },
                pages=StatusPage(self.state, config.destinations, _ui_tokens(config),
                                 previews=config.http.ui_previews, audit=self.audit,
                                 reviews=self.reviews, pulls=self.pulls) if config.http.ui else None,
                allowed_hosts=config.http.allowed_hosts,
            )
        self._started: list[object] = []  # the parts running, stopped again by stop()
        self._stop = threading.Event()
        self.retention = Retention(self.state, self.spool, config.retention, config.storage.min_free_bytes,
                                   deletions=self.metrics.retention_deletions, audit=self.audit)
        self._retention = threading.Thread(target=self._retention_loop, name="retention", daemon=True)

    def _incomplete(self, processor: Processor, job_id: int) -> None:
        """A series completion failed as not whole: counted, and its job's end audited."""
        self.metrics.series_incomplete.inc()
        processor.audit_end(job_id, JobState.FAILED)

    def _sent_to(self, destination: str) -> bool:
        """A send to ``destination`` went through lately: it answers."""
        return any(ok for _, ok, _ in self.state.recent_sends(100, destination))

    def _scp_problem(self) -> str | None:
        if not self.scp.listening:
            return "the DICOM SCP is not listening"
        return None if self.scp.serving else "the DICOM SCP's server thread is not running"

    def _retention_problem(self) -> str | None:
        """The retention thread, once started, runs until the node stops."""
        if self._retention.ident is None or self._retention.is_alive() or self._stop.is_set():
            return None
        return "the retention thread is not running"

    def _stuck_problem(self) -> str | None:
        """Model runs more than a margin past their deadline, by preset: the deadline did
        not free the processing slot (a model process that does not stop)."""
        problems = [f"model {name}: {problem}" for name, service in self.models.items()
                    for problem in [service.overdue(_STUCK_MARGIN_SECONDS)] if problem]
        return "; ".join(problems) or None

    def _state_store_check(self) -> str | None:
        self.state.check_writable()
        return None

    def start(self) -> None:
        """Resume, run the processing and send threads, open HTTP, run completion and, last, open the SCP. On
        any failure the parts already started are stopped again and the error
        propagates (a ``StartupError`` for a port taken since ``check_startup``)."""
        try:
            self.audit.start()
            self._started.append(self.audit)
            self.audit.record_application("Application Start", detail=_config_summary(self.config))
            self.notifier.start()
            resumed = self.state.resume_interrupted()
            names = [destination.name for destination in self.config.destinations]
            adopted = self.state.adopt_unsent(names[0])
            if adopted:
                log.info("%d SEG(s) of an earlier release queued for destination %s", adopted, names[0])
            orphaned = self.state.fail_unconfigured(names)
            if orphaned:
                log.warning("%d pending send(s) to destinations no longer configured have failed"
                            " (`dicom-node status` names them)", orphaned)
            self.echoes.start()
            self._report_weights()
            self._start_models()
            if not self.config.security.allowed_callers:
                log.warning("security.allowed_callers is empty: every association will be rejected")
            for destination in self.config.destinations:  # once, at start; the config refuses it without allow_insecure
                if destination.insecurity:
                    log.warning("destination %s (%s) is insecure, allowed by allow_insecure: true: %s",
                                destination.name, destination.peer, destination.insecurity)
            self.queue.start()
            self._started.append(self.queue)
            if self.http is not None:
                self._listen(self.http, "http", self.config.http.bind_address, self.config.http.port)
            # the completion timers of series still receiving count from when the SCP
            # accepts again, so that a sender resending the series is in time
            restarted = self.state.restart_completion_timers()
            if resumed or restarted:
                log.info("resuming: %d interrupted job(s), %d series still receiving", resumed, restarted)
            self.completion.start()
            self._started.append(self.completion)
            self._listen(self.scp, "node", self.config.node.bind_address, self.config.node.port)
            if self.pulls is not None and self.pulls.resume():  # after the SCP: a C-MOVE comes back to it
                log.info("resuming the pulls started from the status page")
        except BaseException:
            self._stop_started()
            raise
        self._retention.start()

    def _start_models(self) -> None:
        """Start the embedded model processes now (one per preset), so their imports are
        done before the first series."""
        for name, service in self.models.items():
            if isinstance(service, ModelRunner):
                service.start()
                log.info("model runner started (pid %s): %s (model preset %s)", service.pid,
                         self.segmenters[name].describe(), name)

    def _listen(self, part: StorageSCP | HttpEndpoint, section: str, address: str, port: int) -> None:
        try:
            part.start()
        except OSError as exc:
            raise _listen_error(exc, section, address, port) from exc
        self._started.append(part)

    def _stop_started(self) -> None:
        """Stop what runs: the network first, so nothing new arrives while the rest
        stops; the job in hand gets ``node.shutdown_seconds`` to finish, else the model
        is stopped and the job handed back; then the model process."""
        for part in (self.http, self.scp, self.completion):
            if part is not None and any(part is running for running in self._started):
                part.stop()
        if any(self.queue is running for running in self._started):
            self.queue.stop(self.config.node.shutdown_seconds, interrupt=self._stop_models)
        self._stop_models()
        self._started = []

    def _stop_models(self) -> None:
        for service in self.models.values():
            service.close()

    def stop(self) -> None:
        log.info("stopping")
        self._stop.set()
        self.echoes.stop()
        audited = any(self.audit is running for running in self._started)
        if self.pulls is not None:  # each left to resume at the next start
            self.pulls.stop()
        self._stop_started()
        if self._retention.is_alive():  # a run in hand ends before the state store closes under it
            self._retention.join(timeout=30)
        if audited:
            self.audit.record_application("Application Stop")
        self.audit.close()
        self.notifier.close()  # the notices of the last jobs, within a few seconds
        if self.queue.stopped:
            self.state.close()
        else:  # a thread still holds a job; the process exits without closing under it
            log.warning("a job did not end within node.shutdown_seconds; it runs again at the next start")

    def _retention_loop(self) -> None:
        """Retention every ``retention.interval_seconds``, whatever the periods (disk
        pressure needs it too), after the expiry of reviews (``review.expire_days``); a run
        that fails is logged and the next one runs."""
        while not self._stop.is_set():
            try:
                self.reviews.expire(self.config.review.expire_days)  # held objects unreviewed too long
            except Exception:
                log.exception("expiring reviews failed; trying again in %ss", self.config.retention.interval_seconds)
            try:
                self.retention.run()
            except Exception:
                log.exception("retention run failed; trying again in %ss", self.config.retention.interval_seconds)
            self._stop.wait(self.config.retention.interval_seconds)

    def _weights_checks(self) -> dict[str, Callable[[], None]]:
        """Each model preset's weights check: its segmenter's, or its model's; none with
        Celery workers (each checks its own weights and fails a task without them)."""
        if self.config.workers.backend == "celery":
            return {}
        checks = {}
        for name, segmenter in self.segmenters.items():
            check = (getattr(segmenter, "check_weights", None)
                     or getattr(getattr(segmenter, "model", None), "check_weights", None))
            if check is not None:
                checks[name] = check
        return checks

    def _weights_problems(self) -> dict[str, str | None]:
        """Each checked preset's missing weights (None: all there), named by preset
        when the config has several."""
        problems: dict[str, str | None] = {}
        for name, check in self._weights_checks().items():
            try:
                check()
                problems[name] = None
            except WeightsMissingError as exc:
                problems[name] = str(exc) if len(self.config.models) == 1 else f"model {name}: {exc}"
        return problems

    def _weights_problem(self) -> str | None:
        """What is missing of the configured models' weights (None: all there)."""
        return "; ".join(problem for problem in self._weights_problems().values() if problem) or None

    def _report_weights(self) -> None:
        for name, problem in self._weights_problems().items():
            if problem:
                log.error("%s", problem)
            else:
                log.info("model weights present for %s", self.segmenters[name].describe())


def _ui_tokens(config: Config) -> PageTokens:
    """The status page's tokens, from the files or environment variables the config names
    (checked at start); each at least 16 characters, the two different."""
    http = config.http

    def read(key: str) -> str | None:
        file, env = getattr(http, f"{key}_file"), getattr(http, f"{key}_env")
        if file is not None:
            token, where = file.read_text(encoding="utf-8").strip(), f"http.{key}_file {file}"
        elif env is not None:
            token, where = os.environ.get(env, "").strip(), f"http.{key}_env {env}"
        else:
            return None
        if len(token) < 16:
            raise ConfigError(f"{where}: the token must be at least 16 characters")
        return token

    action, read_only = read("ui_token"), read("ui_read_token")
    try:
        tokens = PageTokens(action=action, read=read_only, public_read=http.ui_public_read)
    except ValueError as exc:  # the two tokens are one
        raise ConfigError(f"http.ui_read_token_file/_env: {exc}") from exc
    if action is None:
        log.warning("http.ui is on without http.ui_token_file or http.ui_token_env: the status page has no actions")
    if http.ui_public_read:
        log.warning("http.ui_public_read is true: the status page's reads need no token")
    return tokens


def _config_summary(config: Config) -> dict[str, object]:
    """What the Application Start event records of the configuration: its digest (a changed
    configuration shows in the trail) and what it opens and sends to (no secret)."""
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
    return {"config_sha256": digest, "ae_title": config.node.ae_title,
            "dicom": f"{config.node.bind_address}:{config.node.port}",
            "http": f"{config.http.bind_address}:{config.http.port}" if config.http.port else None,
            "destinations": [{"name": d.name, "peer": d.peer} for d in config.destinations]}


def model_service(config: Config, preset: ModelPreset) -> ModelService:
    """Where a preset's model runs: its own embedded warm runner, or GPU workers over Celery."""
    if config.workers.backend == "celery":
        from dicom_node.remote.client import CeleryModels

        return CeleryModels(preset.settings, config.workers, preset.name)
    return ModelRunner(preset.settings)


def serve(config: Config) -> None:
    """Run the node until SIGTERM or SIGINT; a ``StartupError`` if it cannot start."""
    node = Node(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node.start()
        stop.wait()
    finally:
        node.stop()
