"""What an operator meets: start-up failures in one line with their own exit status, the
command's version and help, the called AE title check, and ``status`` for scripts."""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.cli import ExitStatus, _parser
from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.service import Node, StartupError, StartupProblem
from dicom_node.store.state import JobState, JobUpdate, SeriesRef, StateStore
from tests.support.node import NodeProcess, node_config, status_of
from tests.support.paths import LOCALHOST, REPO, free_port

# -- start-up failures ------------------------------------------------------------------

def _serve(folder: Path, config: dict, *, drop_capabilities: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``dicom-node serve`` that is expected to fail at start; as root, without the
    capabilities named (so that root meets the limits an ordinary service user meets)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    prefix: list[str] = []
    if drop_capabilities and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop capabilities")
        prefix = ["setpriv", "--bounding-set", ",".join(f"-{cap}" for cap in drop_capabilities)]
    return subprocess.run([*prefix, sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=folder)


def _the_error_line(result: subprocess.CompletedProcess, key: str) -> str:
    """The one stderr line naming ``key``; it is the last line, and no traceback came."""
    assert "Traceback" not in result.stderr, result.stderr
    naming = [line for line in result.stderr.splitlines() if key in line]
    assert len(naming) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == naming[0], result.stderr
    return naming[0]


def _busy(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((LOCALHOST, port))
    sock.listen()
    return sock


@pytest.mark.peers
def test_a_busy_dicom_port_is_one_line_and_its_own_exitstatus_of(tmp_path, phantom_weights):
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights)
    port = config["node"]["port"]
    with _busy(port):
        result = _serve(tmp_path / "node", config)
    assert result.returncode == ExitStatus.PORT_IN_USE == 3
    line = _the_error_line(result, "node.port")
    assert line == f"dicom-node: node.port {port} on 127.0.0.1 is already in use"


@pytest.mark.peers
def test_a_busy_http_port_is_one_line_and_its_own_exitstatus_of(tmp_path, phantom_weights):
    http_port = free_port()
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         http={"port": http_port})
    with _busy(http_port):
        result = _serve(tmp_path / "node", config)
    assert result.returncode == ExitStatus.PORT_IN_USE
    line = _the_error_line(result, "http.port")
    assert line == f"dicom-node: http.port {http_port} on 127.0.0.1 is already in use"
    assert "HTTP health" not in result.stderr and "listening as" not in result.stderr  # found before anything ran


def _bad_certificate(tmp_path: Path) -> Path:
    path = tmp_path / "pki" / "node.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return path


@pytest.mark.peers
def test_a_part_that_fails_late_stops_the_parts_already_running(tmp_path, phantom_weights):
    """The SCP, opened last, fails on a certificate that reads but does not load: the
    worker, completion and the HTTP endpoint already run, and the process still ends."""
    pem = _bad_certificate(tmp_path)
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         http={"port": free_port()}, node={"tls": {"certificate": str(pem), "private_key": str(pem)}})
    result = _serve(tmp_path / "node", config)
    assert result.returncode == ExitStatus.CONFIG_ERROR
    line = _the_error_line(result, "configuration error")
    assert line.startswith("configuration error: node.tls: cannot load certificate")
    assert f"HTTP health and metrics on 127.0.0.1:{config['http']['port']}" in result.stderr


class _NoModel:
    def describe(self) -> str:
        return "none"


def test_a_failed_start_stops_every_part_it_started(tmp_path):
    pem = _bad_certificate(tmp_path)
    config = parse_config({
        "node": {"port": free_port(), "tls": {"certificate": str(pem), "private_key": str(pem)}},
        "destination": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()},
        "http": {"port": free_port()},
    }, tmp_path)
    node = Node(config, segmenter=_NoModel())
    with pytest.raises(ConfigError, match="node.tls"):
        node.start()
    assert not node.scp.listening and not node.queue.alive and not node.completion._thread.is_alive()
    with socket.socket() as sock:
        sock.bind((LOCALHOST, config.http.port))  # the HTTP endpoint let its port go
    node.stop()


def test_a_port_taken_is_found_before_any_job_is_touched(tmp_path):
    config = parse_config({
        "node": {"port": free_port()},
        "destination": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()},
        "http": {"port": 0},
    }, tmp_path)
    with _busy(config.node.port), pytest.raises(StartupError) as raised:
        Node(config, segmenter=_NoModel())
    assert (raised.value.key, raised.value.value, raised.value.problem) == (
        "node.port", config.node.port, StartupProblem.PORT_IN_USE)
    assert not (tmp_path / "var").exists()  # neither the spool nor the state store was opened


@pytest.mark.peers
def test_a_privileged_port_without_privileges(tmp_path, phantom_weights):
    if os.geteuid() != 0 and int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 104:
        pytest.skip("this host lets anyone listen on port 104")
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         node={"port": 104})
    result = _serve(tmp_path / "node", config, drop_capabilities=("net_bind_service",))
    assert result.returncode == ExitStatus.PORT_NOT_PERMITTED
    line = _the_error_line(result, "node.port")
    assert line.startswith("dicom-node: node.port 104 on 127.0.0.1 is not permitted")


@pytest.mark.peers
def test_an_unreadable_tls_file(tmp_path, phantom_weights):
    missing = tmp_path / "pki" / "node.pem"
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         node={"tls": {"certificate": str(missing), "private_key": str(missing)}})
    result = _serve(tmp_path / "node", config)
    assert result.returncode == ExitStatus.FILE_UNREADABLE
    line = _the_error_line(result, "node.tls.certificate")
    assert line == f"dicom-node: node.tls.certificate {missing} cannot be read (No such file or directory)"


@pytest.mark.peers
def test_an_unwritable_spool_folder(tmp_path, phantom_weights):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    spool = locked / "spool"
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         storage={"spool_dir": str(spool)})
    try:
        result = _serve(tmp_path / "node", config, drop_capabilities=("dac_override", "dac_read_search"))
    finally:
        locked.chmod(0o700)
    assert result.returncode == ExitStatus.FOLDER_UNWRITABLE
    line = _the_error_line(result, "storage.spool_dir")
    assert line == f"dicom-node: storage.spool_dir {spool} cannot be created ({locked} is not writable)"


# -- version, help, make run --------------------------------------------------------------

def test_version():
    result = subprocess.run([sys.executable, "-m", "dicom_node", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert result.stdout == f"dicom-node {importlib.metadata.version('dicom-node')}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "dicom-node"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {sub}")


def test_every_option_of_every_command_has_help():
    parsers = dict(_parsers(_parser()))
    assert {"dicom-node serve", "dicom-node status", "dicom-node weights import"} <= set(parsers)
    missing = [f"{name}: {action.dest}" for name, parser in parsers.items() for action in parser._actions
               if not (action.help or "").strip()]
    assert missing == []


def test_make_run_takes_the_config_file():
    def command(*args: str) -> str:
        # under `make test` the environment says we are a sub-make, which adds directory lines
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "--no-print-directory", "-n", "run", *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    site = "/etc/dicom-node/site.yaml"
    assert command(f"CONFIG={site}") == f".venv/bin/dicom-node serve --config {site}"
    assert command() == ".venv/bin/dicom-node serve --config config.yaml"


# -- the called AE title ----------------------------------------------------------------------

def _echo(port: int, called: str) -> int:
    return subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", called, LOCALHOST, str(port)],
                          capture_output=True, timeout=60).returncode


def _associate(port: int, called: str, calling: str = "ECHOSCU"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate(LOCALHOST, port, ae_title=called)


@pytest.mark.peers
def test_another_called_ae_title_is_rejected(tmp_path, phantom_weights):
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", destination=("PACS", free_port()),
                                                      weights_dir=phantom_weights)).start()
    try:
        assert _echo(node.port, "DICOMNODE") == 0
        assert _echo(node.port, "WRONG") != 0
        assoc = _associate(node.port, "WRONG")
        assert assoc.is_rejected
        primitive = assoc.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x01, 0x01, 0x07)
        assoc = _associate(node.port, "WRONG", calling="STRANGER")  # an unknown caller is told that first
        assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x03
    finally:
        node.stop()
    assert "called AE 'WRONG'" in node.log()


@pytest.mark.peers
def test_any_called_ae_title_when_configured(tmp_path, phantom_weights):
    config = node_config(tmp_path / "node", destination=("PACS", free_port()), weights_dir=phantom_weights,
                         security={"accept_any_called_ae_title": True})
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert _echo(node.port, "WRONG") == 0
        assert _echo(node.port, "DICOMNODE") == 0
    finally:
        node.stop()


# -- status for scripts ------------------------------------------------------------------------

_JOBS = 600  # enough output (about 48 KB as text) that a closed pipe is met mid-output
_HOUR = 3600.0


@pytest.fixture(scope="module")
def jobs_config(tmp_path_factory) -> Path:
    """A config whose state store holds many old sent jobs and two recent ones, one failed."""
    folder = tmp_path_factory.mktemp("status") / "node"
    config = node_config(folder, destination=("PACS", free_port()), weights_dir=folder / "weights")
    folder.mkdir(parents=True)
    state = StateStore(Path(config["storage"]["state_db"]))
    old = time.time() - 2 * _HOUR
    root = "1.2.826.0.1.3680043.8.498"
    for n in range(1, _JOBS + 1):
        recent = n > _JOBS - 2
        now = None if recent else old
        ref = SeriesRef(f"{root}.1.{n}", f"{root}.2.{n}", "MODALITY", folder / "spool" / str(n))
        state.record_instance(ref, f"{root}.3.{n}", "1.2.840.10008.5.1.4.1.1.4", ref.folder / "a.dcm", now=now)
        job = state.complete_series(ref.series_instance_uid, now=now)
        if n == _JOBS:
            state.update_job(job, JobState.FAILED, JobUpdate(
                reason="send failed after 5 attempts", attempts=5, last_error="PACS answered 0xA700",
                sequence_class="T1", preprocessing="invert_black_background"))
        else:
            state.update_job(job, JobState.SENT, JobUpdate(reason="sent", attempts=1), now=now)
    state.close()
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_status_json_one_object_per_job(jobs_config):
    lines = status_of(jobs_config, "--json").stdout.splitlines()
    assert len(lines) == _JOBS
    jobs = [json.loads(line) for line in lines]
    failed = jobs[-1]
    assert {key: failed[key] for key in ("state", "reason", "last_error", "attempts", "sequence_class",
                                         "preprocessing", "series_instance_uid", "calling_ae_title")} == {
        "state": "failed", "reason": "send failed after 5 attempts", "last_error": "PACS answered 0xA700",
        "attempts": 5, "sequence_class": "T1", "preprocessing": "invert_black_background",
        "series_instance_uid": f"1.2.826.0.1.3680043.8.498.2.{_JOBS}", "calling_ae_title": "MODALITY"}
    assert failed["study_instance_uid"] == f"1.2.826.0.1.3680043.8.498.1.{_JOBS}"
    created = datetime.fromisoformat(jobs[0]["created_at"])
    assert created.utcoffset() is not None  # ISO 8601 with its zone
    assert abs(time.time() - created.timestamp() - 2 * _HOUR) < 60
    assert datetime.fromisoformat(jobs[0]["updated_at"]) >= created
    assert 2 * _HOUR - 60 < jobs[0]["age_seconds"] < 2 * _HOUR + 60
    assert 0 <= failed["age_seconds"] < 60
    assert isinstance(failed["id"], int)


def test_status_filters_by_state_and_age(jobs_config):
    failed = status_of(jobs_config, "--json", "--state", "failed").stdout.splitlines()
    assert [json.loads(line)["state"] for line in failed] == ["failed"]
    recent = [json.loads(line) for line in status_of(jobs_config, "--json", "--since", str(_HOUR)).stdout.splitlines()]
    assert [job["state"] for job in recent] == ["sent", "failed"]
    text = status_of(jobs_config, "--state", "failed", "--state", "sent", "--since", str(_HOUR)).stdout
    lines = text.splitlines()
    assert lines[0].startswith("workers: embedded warm runner, ") and lines[1].startswith("destination pacs (")
    assert lines[2] == "sent: 1" and "failed: 1" in text
    assert status_of(jobs_config, "--state", "received").stdout.splitlines()[2:] == ["no jobs"]


@pytest.mark.parametrize("form", [[], ["--json"]])
def test_status_into_a_closed_pipe_exits_0_quietly(jobs_config, form):
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, 4096)  # a small pipe: the output cannot fit before it closes
    process = subprocess.Popen([sys.executable, "-m", "dicom_node", "status", "--config", str(jobs_config), *form],
                               stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = reader.readline()  # what `| head -n 1` does: read one line, close the pipe
    code = process.wait(timeout=120)
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert first.strip()
    assert code == 0 and stderr == ""


# -- retry --reprocess --------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.peers
def test_retry_reprocess_segments_a_t2_series_after_the_policy_changed(tmp_path, phantom_weights, mri_dir, pacs):
    """A T2 series skipped by policy; the policy changes to `T2: unprocessed`, the node
    restarts, `retry --reprocess` queues the series again and its SEG reaches the PACS."""
    from tests.support.asserts import assert_exactly_one_seg, series_uid_of
    from tests.support.dcmtk import storescu
    from tests.support.wait import wait_until

    t2 = mri_dir / "t2_siemens_3t_tse_ax_adi"
    pacs.start()
    config = node_config(tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=phantom_weights)
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        storescu(node.port, t2)
        [skipped] = wait_until(lambda: [j for j in node.jobs() if j.state is JobState.SKIPPED], 120, 0.5,
                               "the T2 series skipped")
        assert skipped.sequence_class == "T2" and "policy" in skipped.reason
        refused = node.cli("retry", str(skipped.id))  # a plain retry is for failed jobs
        assert refused.returncode == ExitStatus.CONFIG_ERROR
        assert f"retry --reprocess {skipped.id}" in refused.stderr
        assert node.stop() == 0

        config["pipeline"] = {**config["pipeline"], "policy": {"T2": "unprocessed"}}
        node.config = config
        node.start()
        queued = node.cli("retry", "--reprocess", str(skipped.id))
        assert queued.returncode == 0, queued.stderr
        jobs = wait_until(lambda: [j for j in node.jobs() if j.reprocess_of == skipped.id and j.state in
                                   (JobState.SENT, JobState.FAILED, JobState.NO_RESULT)], 300, 1, "the new job")
        again = jobs[0]
        assert again.state is JobState.SENT, again.reason
        assert (again.sequence_class, again.preprocessing) == ("T2", "none")
        assert {job.id: job.state for job in node.jobs()}[skipped.id] is JobState.SKIPPED  # keeps its outcome
        seg = assert_exactly_one_seg(pacs, series_uid_of(t2))
        assert str(seg.dataset.SeriesInstanceUID) == again.seg_series_uid
        # the old job is no longer the latest of its series: the new one is what to process again
        again_refused = node.cli("retry", "--reprocess", str(skipped.id))
        assert again_refused.returncode == ExitStatus.CONFIG_ERROR
        assert f"process job {again.id} again instead" in again_refused.stderr
    finally:
        node.stop()


def test_retry_reprocess_refuses_a_job_that_has_not_ended(tmp_path):
    state = StateStore(tmp_path / "state.sqlite3")
    ref = SeriesRef("1.2.3", "1.2.3.4", "MODALITY", tmp_path)
    state.record_instance(ref, "1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.4", tmp_path / "a.dcm")
    job = state.complete_series(ref.series_instance_uid)
    state.close()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"destination": {"ae_title": "PACS", "host": LOCALHOST, "port": 104},
                                      "storage": {"state_db": str(tmp_path / "state.sqlite3"),
                                                  "spool_dir": str(tmp_path / "spool")}}))
    for args in (["--reprocess", str(job)], ["--reprocess", "99"], [str(job)]):
        result = subprocess.run([sys.executable, "-m", "dicom_node", "retry", *args, "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == ExitStatus.CONFIG_ERROR, args
        assert "Traceback" not in result.stderr and result.stderr.strip(), args
    assert "is received; only ended jobs" in subprocess.run(
        [sys.executable, "-m", "dicom_node", "retry", "--reprocess", str(job), "--config", str(config)],
        capture_output=True, text=True, timeout=60).stderr
