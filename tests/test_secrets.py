"""Secrets and insecure transport: what the config refuses (credentials inside URLs, a
broker password in the config file, DICOMweb credentials in clear or TLS unverified
without ``allow_insecure``), where the broker URL comes from instead, and what the
GPU workers' Redis keeps (results deleted once read, replies decompressed within a
bound). The TLS peers are in ``test_tls.py``."""

from __future__ import annotations

import traceback
import uuid
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_node.config import parse_config, without_credentials
from dicom_node.errors import ConfigError
from dicom_node.remote.messages import RESULT_EXPIRES_SECONDS, decode_reply, image_bytes_limit, make_app, pack, unpack
from dicom_node.service import StartupError, StartupProblem, check_startup
from pipeline.errors import SegmentationError
from tests.support.paths import free_port
from tests.support.redis import RedisServer

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
SECRET = "Sup3r-s3cret"
BASIC = {"type": "basic", "username": "node", "password_env": "ARCHIVE_PASSWORD"}


def _web(**fields) -> dict:
    return {"name": "archive", "protocol": "dicomweb", "url": "https://archive.example.org/dicom-web", **fields}


def _refusal(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as refused:
        parse_config(data, Path("."))
    return refused.value


def test_credentials_inside_a_dicomweb_url_are_refused_naming_the_key_never_the_password():
    error = _refusal({"destinations": [_web(url=f"https://node:{SECRET}@archive.example.org/dicom-web")]})
    assert "destinations[0].url" in str(error) and "inside the URL is refused" in str(error)
    # not in the message, nor in the chained pydantic error a traceback would print
    assert SECRET not in "".join(traceback.format_exception(error))


@pytest.mark.parametrize("fields, problem", [
    ({"url": "http://archive.example.org/dicom-web", "auth": BASIC}, "auth over http:// sends the credentials in clear"),
    ({"url": "http://archive.example.org/dicom-web", "auth": {"type": "bearer", "token_env": "T"}}, "in clear"),
    ({"verify_tls": False}, "verify_tls false accepts any server's certificate"),
])
def test_dicomweb_credentials_in_clear_or_tls_unverified_need_allow_insecure(fields, problem):
    error = _refusal({"destinations": [_web(**fields)]})
    assert "destinations[0]" in str(error) and problem in str(error) and "allow_insecure: true" in str(error)
    [allowed] = parse_config({"destinations": [_web(**fields, allow_insecure=True)]}, Path(".")).destinations
    assert problem in allowed.insecurity  # what the start-up warning names
    # plain http without credentials, and https with them, are not insecure in this sense
    assert parse_config({"destinations": [_web(url="http://a/dicom-web"), {**_web(auth=BASIC), "name": "b"}]},
                        Path(".")).destinations[0].insecurity is None


def test_allow_insecure_is_a_dicomweb_setting():
    assert "allow_insecure: not a setting of protocol dimse" in str(_refusal({"destinations": [
        {**PACS, "allow_insecure": True}]}))


def test_a_dimse_destination_drops_the_host_name_check_only_with_a_ca_of_its_own():
    error = _refusal({"destinations": [{**PACS, "tls": {"check_hostname": False}}]})
    assert "tls.check_hostname false needs tls.ca_certificates" in str(error)
    [pacs] = parse_config({"destinations": [{**PACS, "tls": {"check_hostname": False, "ca_certificates": "ca.pem"}}]},
                          Path(".")).destinations
    assert pacs.tls.check_hostname is False
    assert parse_config({"destinations": [{**PACS, "tls": {}}]}, Path(".")).destinations[0].tls.check_hostname
    error = _refusal({"destinations": [PACS], "node": {"tls": {"certificate": "c", "private_key": "k",
                                                                "check_hostname": False}}})
    assert "node.tls" in str(error) and "not of the SCP's" in str(error)


def test_url_credentials_are_masked_wherever_a_url_is_shown():
    text = f"STOW-RS to https://node:{SECRET}@archive/dicom-web/studies failed; redis://:{SECRET}@redis:6379/0"
    assert without_credentials(text) == ("STOW-RS to https://***@archive/dicom-web/studies failed;"
                                         " redis://***@redis:6379/0")
    assert without_credentials("https://archive.example.org/a@b") == "https://archive.example.org/a@b"  # a path's @


def test_a_broker_password_is_never_in_the_config_file(tmp_path, monkeypatch):
    base = {"destinations": [PACS], "workers": {"backend": "celery"}}
    error = _refusal({**base, "workers": {"backend": "celery", "broker_url": f"redis://:{SECRET}@redis:6379/0"}})
    assert "workers.broker_url" in str(error) and "broker_url_file" in str(error)
    assert SECRET not in "".join(traceback.format_exception(error))
    error = _refusal({**base, "workers": {"backend": "celery", "broker_url": "redis://r/0", "broker_url_env": "B"}})
    assert "give one of broker_url, broker_url_file or broker_url_env" in str(error)

    (tmp_path / "broker.url").write_text(f"redis://:{SECRET}@redis:6379/0\n")
    from_file = parse_config({**base, "workers": {"backend": "celery", "broker_url_file": "broker.url"}}, tmp_path)
    assert from_file.workers.broker_url_file == tmp_path / "broker.url"  # relative to the config's folder
    assert from_file.workers.broker() == f"redis://:{SECRET}@redis:6379/0"
    assert make_app(from_file.workers).conf.broker_url == f"redis://:{SECRET}@redis:6379/0"

    from_env = parse_config({**base, "workers": {"backend": "celery", "broker_url_env": "DICOM_NODE_BROKER"}},
                            tmp_path).workers
    monkeypatch.setenv("DICOM_NODE_BROKER", f"redis://:{SECRET}@redis:6379/1")
    assert from_env.broker() == f"redis://:{SECRET}@redis:6379/1"
    monkeypatch.setenv("DICOM_NODE_BROKER", "not a url")
    with pytest.raises(ConfigError, match="does not hold a redis:// or rediss:// URL"):
        from_env.broker()


def test_an_unreadable_broker_url_file_stops_start_up_with_exit_status_6(tmp_path):
    config = parse_config({"destinations": [PACS], "node": {"port": free_port()}, "http": {"port": 0},
                           "storage": {"spool_dir": "spool", "state_db": "state.sqlite3"},
                           "workers": {"backend": "celery", "broker_url_file": "missing.url"}}, tmp_path)
    with pytest.raises(StartupError) as refused:
        check_startup(config)
    assert (refused.value.key, refused.value.problem) == ("workers.broker_url_file", StartupProblem.FILE_UNREADABLE)
    assert "missing.url" in str(refused.value)


def _image(shape: tuple[int, ...], dtype=np.uint8) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4))


def test_a_worker_reply_is_decompressed_only_up_to_the_bound_of_its_grid():
    request = _image((8, 8, 8), np.float32)
    limit = image_bytes_limit(int(np.prod(request.shape)))
    reply = {"labels": pack(_image((8, 8, 8))), "names": {"1": "liver"}, "codes": None,
             "model": {"name": "m", "version": "1", "task": "t"},
             "report": {}}
    assert np.array_equal(unpack(reply["labels"], limit).get_fdata(), np.zeros((8, 8, 8)))
    # a reply far larger than its request's grid (a forged or corrupt one): zeros compress
    # 1000 to 1, and it is refused before it is ever whole in memory
    bomb = _image((400, 400, 400))
    with pytest.raises(SegmentationError, match=f"decompresses to more than {limit} bytes"):
        decode_reply({**reply, "labels": pack(bomb)}, limit)
    with pytest.raises(SegmentationError, match="cut short"):
        unpack(pack(_image((8, 8, 8)))[:-40], limit)
    with pytest.raises(SegmentationError, match="cannot be read"):
        unpack("not base64 !", limit)
    assert len(zlib.compress(bomb.to_bytes(), 1)) < limit < len(bomb.to_bytes())  # the bound, not the wire, refused it


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.peers
def test_a_result_lives_in_redis_an_hour_at_most_and_is_deleted_once_read(redis_server, tmp_path):
    import redis
    from celery.result import AsyncResult

    from dicom_node.config import WorkerSettings
    from dicom_node.remote.client import take_result

    app = make_app(WorkerSettings(backend="celery", broker_url=redis_server.url))
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, {"labels": "..."}, "SUCCESS")  # as a worker stores its reply
    key = f"celery-task-meta-{task_id}"
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert 0 < client.ttl(key) <= RESULT_EXPIRES_SECONDS
        assert take_result(AsyncResult(task_id, app=app), timeout=5) == {"labels": "..."}
        assert not client.exists(key)
    finally:
        client.close()


def test_a_worker_reply_from_a_later_release_keeps_what_this_node_knows_of_its_report():
    reply = {"labels": pack(_image((4, 4, 4))), "names": {"1": "liver"}, "codes": None,
             "model": {"name": "m", "version": "1", "task": "t"},
             "report": {"worker": "gpu1:42", "device": "cuda", "loads": 1, "load_seconds": 2.0, "forward_seconds": 1.5,
                        "total_seconds": 4.0, "a_timing_of_a_later_release": 9.0}}
    report = decode_reply(reply, image_bytes_limit(64)).report
    assert (report.worker, report.forward_seconds, report.started_at) == ("gpu1:42", 1.5, 0.0)
