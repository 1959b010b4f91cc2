"""Every example command in the README's shell blocks runs as written, or the README says
why not.

Each command line of a fenced ``sh`` block (``\\`` continues a line, ``#`` starts a
comment) is one test. It runs in a fresh folder laid out like a checkout: ``.venv`` is
this repository's, and ``config.yaml`` is the repository's own with free ports, the
phantom model's weights and a state store that holds a failed job (id 1). The README's
placeholders stand for real things: ``JOB_ID`` that job, ``INPUT_DIR`` the shared T1
series, ``OUT_DIR`` and ``DIR`` new folders. ``serve`` runs for a short life: until
``/healthz`` answers 200, then SIGTERM, and it must exit 0. Every other command must
exit 0 without a traceback.

A command is not run when an HTML comment right before its block says so and why::

    <!-- example not run: KEY: REASON -->

KEY is a piece of the command line (``*`` for the whole block). A KEY that matches no
command of its block fails, so that the README's reasons stay true.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
import yaml

from dicom_node.store.state import JobState, JobUpdate, SeriesRef, StateStore
from tests.support.paths import REPO, data_dir, free_port
from tests.support.wait import wait_until

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet

README = REPO / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*example not run:\s*(?P<key>[^:]+?)\s*:\s*(?P<reason>.+?)\s*-->\s*$")
_SHELLS = {"sh", "bash", "shell"}
_PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b|\b(?:DIR|FILE|IMAGES|REFERENCES|SECONDS)\b")
_LONG_RUNNING = {"serve"}  # dicom-node commands that run until stopped


@dataclass(frozen=True)
class Example:
    line: int  # where the command starts in the README
    command: str  # as written (comment removed, continuations joined)
    not_run: str | None  # the README's reason, if it is not run

    @property
    def id(self) -> str:
        return f"README:{self.line}: {self.command[:70]}"


def _examples(text: str) -> tuple[list[Example], list[str]]:
    """The commands of the shell blocks, and the problems of the markers (keys matching nothing)."""
    examples: list[Example] = []
    problems: list[str] = []
    lines = text.splitlines()
    markers: list[tuple[str, str]] = []
    number = 0
    while number < len(lines):
        line = lines[number]
        marker = _NOT_RUN.match(line.strip())
        fence = _FENCE.match(line)
        if marker:
            markers.append((marker["key"], marker["reason"]))
        elif fence and fence.group(1) in _SHELLS:
            block: list[Example] = []
            number += 1
            pending, start = "", 0
            while number < len(lines) and not lines[number].startswith("```"):
                raw = lines[number]
                if not pending:
                    start = number + 1
                code = _strip_comment(raw)
                if code.rstrip().endswith("\\"):
                    pending += code.rstrip()[:-1] + " "
                elif (pending + code).strip():
                    command = " ".join((pending + code).split())
                    reason = next((why for key, why in markers if key == "*" or key in command), None)
                    block.append(Example(start, command, reason))
                    pending = ""
                number += 1
            for key, _ in markers:
                if key != "*" and not any(key in example.command for example in block):
                    problems.append(f"README: the marker for {key!r} matches no command of the block after it")
            examples += block
            markers = []
        elif line.strip() and not line.lstrip().startswith("<!--"):
            markers = []  # a marker belongs to the block right after it
        number += 1
    return examples, problems


def _strip_comment(line: str) -> str:
    """The line without its shell comment (a ``#`` outside quotes that starts a word)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


EXAMPLES, MARKER_PROBLEMS = _examples(README.read_text())

# What a command does, for the suite's markers (pyproject.toml), so that `make test-quick`
# leaves out a README example that runs the model or starts a server.
_RUNS_A_MODEL = ("dicom-node process", "dicom-node evaluate", "dicom-node demo-model", "bench/throughput.py",
                 "bench/gpu_check.sh", "make test")
_STARTS_A_SERVER = ("dicom-node serve", "dicom-node worker", "bench/ingest.py", "bench/throughput.py",
                    "bench/gpu_check.sh", "make run", "make test")


def _marked(example: Example) -> ParameterSet:
    marks = [mark for mark, words in ((pytest.mark.e2e, _RUNS_A_MODEL), (pytest.mark.peers, _STARTS_A_SERVER))
             if any(word in example.command for word in words)]
    return pytest.param(example, marks=marks, id=example.id)


def test_the_readme_has_examples_and_its_markers_name_real_commands():
    assert len(EXAMPLES) >= 10
    assert MARKER_PROBLEMS == []
    assert all(example.not_run.strip() for example in EXAMPLES if example.not_run is not None)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, phantom_weights, t1_dir) -> Path:
    """A folder laid out like a checkout after `make run`: .venv, and config.yaml (the
    repository's own, with free ports and the phantom weights) whose state store holds a
    failed job 1 over the shared T1 series."""
    folder = tmp_path_factory.mktemp("checkout")
    (folder / ".venv").symlink_to(REPO / ".venv")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["node"]["port"] = free_port()
    config["http"]["port"] = free_port()
    config["destinations"][0]["port"] = free_port()  # nobody listens: nothing is sent anyway
    config["storage"]["min_free_bytes"] = 10_000_000
    config["models"][0]["weights_dir"] = str(phantom_weights)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    state = StateStore(folder / "var" / "state.sqlite3")
    paths = sorted(t1_dir.glob("*.dcm"))
    ref = SeriesRef("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "ORTHANC", t1_dir)
    for n, path in enumerate(paths, start=1):
        state.record_instance(ref, f"1.2.826.0.1.3680043.8.498.3.{n}", "1.2.840.10008.5.1.4.1.1.4", path)
    job = state.complete_series(ref.series_instance_uid)
    # its SEG failed to reach the destination `pacs` (a stand-in file: nobody listens anyway)
    state.claim_next_processing()
    results = folder / "var" / "spool" / "results" / str(job) / "seg"
    results.mkdir(parents=True)
    shutil.copy(paths[0], results / "stand-in.dcm")
    state.start_sending(job, [("pacs", "seg", results)], JobUpdate(result_path=results / "stand-in.dcm",
                                                                  reason="1 segment(s) (made by the test)"))
    [item] = state.outbox(job)
    state.record_send(item.id, ok=False, error="send failed after 5 attempt(s): connection refused (made by the test)")
    assert state.job(job).state is JobState.FAILED
    state.close()
    assert job == 1
    return folder


def _arguments(command: str, folder: Path, job_id: int) -> list[str]:
    words = shlex.split(command)
    # an optional part, [--config FILE], is left out
    kept, depth = [], 0
    for word in words:
        depth += word.count("[")
        if depth == 0:
            kept.append(word)
        depth -= word.count("]")
    values = {"JOB_ID": str(job_id), "INPUT_DIR": str(data_dir() / "t1_siemens_3t_fl2d_sag_hfs"),
              "OUT_DIR": str(folder / "out"), "DIR": str(folder / "dir")}
    substituted = []
    for word in kept:
        unknown = [name for name in _PLACEHOLDER.findall(word) if name not in values]
        assert not unknown, (f"{command!r}: no value for the placeholder {unknown[0]}: give it one in"
                             f" {Path(__file__).name}, or mark the command as not run in the README")
        substituted.append(_PLACEHOLDER.sub(lambda match: values[match.group(0)], word))
    return substituted


def _short_life(arguments: list[str], folder: Path) -> subprocess.CompletedProcess:
    """Start a long-running command, wait until its /healthz answers 200, stop it with SIGTERM."""
    port = yaml.safe_load((folder / "config.yaml").read_text())["http"]["port"]
    log = folder / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(arguments, cwd=folder, stdout=output, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert process.poll() is None, f"{arguments} exited with {process.returncode}: {log.read_text()[-2000:]}"
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, 120, 0.2, f"{' '.join(arguments)} to answer /healthz")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(arguments, code, log.read_text(errors="replace"), "")


@pytest.mark.parametrize("example", [_marked(example) for example in EXAMPLES])
def test_readme_example(example: Example, checkout: Path, tmp_path: Path):
    if example.not_run is not None:
        pytest.skip(f"the README says why it is not run: {example.not_run}")
    folder = tmp_path / "checkout"
    shutil.copytree(checkout, folder, symlinks=True)
    arguments = _arguments(example.command, folder, job_id=1)
    if len(arguments) > 1 and arguments[1] in _LONG_RUNNING:
        result = _short_life(arguments, folder)
    else:
        result = subprocess.run(arguments, cwd=folder, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{example.command!r} exited with {result.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


def _block_after(marker_text: str) -> list[str]:
    """The commands of the README's shell block right after the marker that contains ``marker_text``."""
    lines = README.read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if marker_text in line and _NOT_RUN.match(line.strip()))
    body = lines[start + 2:]
    block = body[:next(n for n, line in enumerate(body) if line.startswith("```"))]
    commands, pending = [], ""
    for raw in block:
        code = _strip_comment(raw).rstrip()
        if code.endswith("\\"):
            pending += code[:-1] + " "
        elif (pending + code).strip():
            commands.append(" ".join((pending + code).split()))
            pending = ""
    return commands


@pytest.mark.e2e
def test_the_phantom_setup_block_runs_from_a_config_outside_the_repository(tmp_path):
    """The README's phantom set-up, run in order as one script from a fresh checkout-like
    folder: the copied config lives outside the repository and finds the weights it imported."""
    commands = _block_after("test_the_phantom_setup_block_runs_from_a_config_outside_the_repository")
    assert len(commands) == 3 and commands[0].startswith("mkdir")
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in (".venv", "models"):
        (folder / name).symlink_to(REPO / name)
    shutil.copy(REPO / "config.yaml", folder / "config.yaml")
    series = data_dir() / "t1_siemens_3t_fl2d_sag_hfs"
    script = "set -e\n" + "\n".join(command.replace("INPUT_DIR", shlex.quote(str(series))) for command in commands)
    result = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    node = tmp_path / "my-node"
    assert (node / "var" / "weights" / "manifest.json").exists()
    assert len(list((node / "segs").glob("*.seg.dcm"))) == 1
