"""The Dockerfile without a Docker engine: hadolint, what it copies, what it runs."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dicom_node.cli import _parser
from dicom_node.config import parse_config
from tests.support.paths import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_reports_nothing():
    hadolint = str(Path(sys.executable).with_name("hadolint")) if Path(sys.executable).with_name("hadolint").exists() else shutil.which("hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_everything_it_copies_exists():
    sources = [src for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M) for src in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} is missing"


def test_entry_command_is_a_real_subcommand_with_a_valid_config():
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE, re.M).group(1))
    command = json.loads(re.search(r"^CMD (.+)$", DOCKERFILE, re.M).group(1))
    assert entry == ["dicom-node"]
    args = _parser().parse_args(command)
    assert args.func.__name__ == "_cmd_serve"
    copied = re.search(r"^COPY (\S+) " + re.escape(args.config) + "$", DOCKERFILE, re.M)
    assert copied, "the config the image starts with must be copied into it"
    config = parse_config(yaml.safe_load((REPO / copied.group(1)).read_text()), Path("/etc/dicom-node"))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", DOCKERFILE, re.M).group(1).split()}
    assert {config.node.port, config.http.port} <= exposed
    assert f":{config.http.port}/healthz" in DOCKERFILE


def test_runs_as_non_root():
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and not user[-1].startswith(("root", "0"))


def test_demo_tooling_stays_out_of_the_image():
    sources = [src for line in re.findall(r"^(?:COPY|ADD) (.+)$", DOCKERFILE, re.M) for src in line.split()[:-1]]
    assert sources
    for source in sources:
        top = (Path(source).parts or (".",))[0]
        assert top not in {".", "demo", "tests", "bench", "models"}, f"COPY {source}: not the product"
