from pathlib import Path

import pytest
from pydantic import BaseModel

from dicom_node.config import load_config, parse_config
from dicom_node.errors import ConfigError
from tests.support.paths import REPO

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


@pytest.mark.parametrize("data, message", [
    ({**MINIMAL, "completion": {"stable_secnds": 3}}, "completion.stable_secnds: unknown key; did you mean stable_seconds?"),
    ({**MINIMAL, "models": [{"name": "a", "weigths_dir": "w"}]}, "models[0].weigths_dir: unknown key; did you mean weights_dir?"),
    ({**MINIMAL, "models": [{"name": "a"}], "rules": [{"name": "r", "models": ["a"], "contineu": True}]},
     "rules[0].contineu: unknown key; did you mean continue?"),
    ({**MINIMAL, "node": {"colour": "red"}}, "node.colour: unknown key"),
])
def test_an_unknown_key_is_named_as_the_readme_writes_it_with_the_nearest_known_key(data, message):
    with pytest.raises(ConfigError) as refused:
        parse_config(data, Path("."))
    assert str(refused.value).endswith(message)  # "node.colour" is close to nothing: no suggestion


def test_list_items_are_named_by_their_index_in_brackets_from_0():
    with pytest.raises(ConfigError) as refused:
        parse_config({"destinations": [{**ARCHIVE, "name": "a"}, {**ARCHIVE, "name": "b", "outputs": ["seg", "pdf"]}]},
                     Path("."))
    assert "destinations[1].outputs[1]: Input should be" in str(refused.value)
    assert "destinations.1" not in str(refused.value)


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


# -- destinations -----------------------------------------------------------------------

ARCHIVE = {"name": "archive", "protocol": "dicomweb", "url": "https://archive.example.org/dicom-web",
           "auth": {"type": "basic", "username": "node", "password_file": "archive.password"},
           "outputs": ["seg", "report"]}


def test_the_single_destination_of_earlier_releases_is_a_list_of_one_named_pacs():
    config = parse_config(MINIMAL, Path("."))
    [pacs] = config.destinations
    assert (pacs.name, pacs.protocol, pacs.ae_title, pacs.outputs) == ("pacs", "dimse", "PACS", ("seg",))
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**MINIMAL, "destinations": [MINIMAL["destination"]]}, Path("."))


def test_destinations_each_with_their_protocol_outputs_and_paths(tmp_path):
    pacs = {**MINIMAL["destination"], "outputs": ["seg", "overlay"], "segmentation_type": "LABELMAP"}
    config = parse_config({"destinations": [pacs, ARCHIVE]}, tmp_path)
    archive = config.destination("archive")
    assert archive.auth.password_file == tmp_path / "archive.password" and archive.verify_tls
    assert archive.peer == "https://archive.example.org/dicom-web"
    # each object once, a SEG per encoding, SEGs first (the report references one)
    assert [request.key for request in config.output_requests] == ["seg", "seg-labelmap", "overlay", "report"]
    assert [request.key for request in config.destination("pacs").requests] == ["seg-labelmap", "overlay"]


@pytest.mark.parametrize("destination, message", [
    ({"name": "x", "protocol": "dimse", "host": "h", "port": 104}, "protocol dimse needs ae_title"),
    ({"name": "x", "protocol": "dicomweb"}, "protocol dicomweb needs url"),
    ({**ARCHIVE, "ae_title": "PACS"}, "ae_title: not a setting of protocol dicomweb"),
    ({**ARCHIVE, "url": "ftp://archive"}, r"destinations\[0\]\.url"),
    ({**ARCHIVE, "outputs": ["seg", "pdf"]}, r"destinations\[0\]\.outputs\[1\]"),
    ({**ARCHIVE, "outputs": []}, "name at least one of seg"),
    ({**ARCHIVE, "auth": {"type": "basic", "username": "u"}}, "needs one of password_file or password_env"),
    ({**ARCHIVE, "auth": {"type": "bearer", "token_env": "T", "password_env": "P"}}, "takes a token"),
    ({**ARCHIVE, "auth": {"type": "basic", "username": "u", "password": "inline"}}, "password: unknown key"),
])
def test_a_bad_destination_is_refused_naming_the_key(destination, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"destinations": [destination]}, Path("."))


def test_destination_names_are_unique():
    with pytest.raises(ConfigError, match="destination name archive is used twice"):
        parse_config({"destinations": [ARCHIVE, ARCHIVE]}, Path("."))
    with pytest.raises(ConfigError, match="name at least one destination"):
        parse_config({"destinations": []}, Path("."))


def test_auth_secrets_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "archive.password").write_text("s3cret\n")
    config = parse_config({"destinations": [ARCHIVE]}, tmp_path)
    assert config.destinations[0].auth.secret() == "s3cret"
    bearer = {**ARCHIVE, "auth": {"type": "bearer", "token_env": "ARCHIVE_TOKEN"}}
    auth = parse_config({"destinations": [bearer]}, tmp_path).destinations[0].auth
    monkeypatch.delenv("ARCHIVE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="environment variable ARCHIVE_TOKEN"):
        auth.secret()
    monkeypatch.setenv("ARCHIVE_TOKEN", "t0ken")
    assert auth.secret() == "t0ken"
