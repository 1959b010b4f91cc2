from pathlib import Path

from pydantic import BaseModel

import pytest

from dicom_node.config import load_config, parse_config
from dicom_node.errors import ConfigError
from tests.peers import REPO

MINIMAL = {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}}


def test_repository_config_loads_with_documented_defaults():
    config = load_config(REPO / "config.yaml")
    assert config.node.bind_address == "127.0.0.1"
    assert config.pipeline.policy.T1.value == "invert_black_background"
    assert config.pipeline.policy.T2 == "skip"
    assert config.storage.spool_dir.is_absolute()


def test_every_config_key_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    config = load_config(REPO / "config.yaml")

    def keys(model, prefix=""):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [key for key in keys(config) if f"`{key}`" not in readme]
    assert not missing, f"undocumented config keys: {missing}"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"node\.prot: unknown key"):
        parse_config({**MINIMAL, "node": {"prot": 1}}, Path("."))


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"completion\.stable_seconds"):
        parse_config({**MINIMAL, "completion": {"stable_seconds": -1}}, Path("."))
    with pytest.raises(ConfigError, match=r"pipeline\.policy\.T2"):
        parse_config({**MINIMAL, "pipeline": {"policy": {"T2": "invert"}}}, Path("."))


def test_destination_is_required():
    with pytest.raises(ConfigError, match="destination"):
        parse_config({}, Path("."))


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = parse_config({**MINIMAL, "storage": {"spool_dir": "spool"}}, tmp_path)
    assert config.storage.spool_dir == tmp_path / "spool"


def test_cli_stops_on_bad_config(tmp_path):
    from dicom_node.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("destination: {ae_title: PACS, host: 127.0.0.1, port: 4242}\nnode: {port: 70000}\n")
    assert main(["status", "--config", str(path)]) == 2
