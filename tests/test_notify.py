"""Webhook notifications (``dicom_node.notify``): a job that failed, waits for review or
was sent is POSTed, signed with HMAC-SHA256, to a real HTTP receiver on 127.0.0.1;
retried with back-off while the receiver is down or answers 5xx, delivered once it is
back, never with a patient's name or ID. The node-level tests run ``dicom-node serve``."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node.audit import Audit
from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.metrics import Metrics
from dicom_node.notify import Notifier
from dicom_node.service import Node, StartupError, StartupProblem, check_startup
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, JobUpdate, StateStore
from dicom_node.work.processor import Processor
from tests.conftest import patient_strings
from tests.derived import copy_series
from tests.support.dcmtk import storescu
from tests.support.inprocess import FakeSegmenter
from tests.support.node import NodeProcess, node_config
from tests.support.paths import free_port
from tests.support.wait import log_has, wait_until
from tests.support.webhook import Received, WebhookReceiver
from tests.test_worker import received_job

KEY = "webhook-signing-key-0123456789abcdef"
NAME, GIVEN, PATIENT_ID = "Mustermann", "Erika", "MRN778899"
GAP_SERIES = "hard_missing_slice_t1_fl2d_sag_hfs_derived"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.key"
    path.write_text(KEY + "\n")
    return path


def _config(tmp_path: Path, key_file: Path, url: str, **webhook):
    return parse_config({
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
        "storage": {"min_free_bytes": 0},
        "notify": [{"name": "ops", "url": url, "secret_file": str(key_file), **webhook}],
    }, tmp_path)


def _notifier(tmp_path: Path, key_file: Path, url: str, **webhook) -> Notifier:
    config = _config(tmp_path, key_file, url, **webhook)
    return Notifier(config.notify, ae_title="DICOMNODE", metrics=Metrics())


def _notify(notifier: Notifier, job_id: int = 7, state: JobState = JobState.FAILED) -> None:
    notifier.notify(job_id=job_id, state=state, reason="the series is not whole: a gap of 9.60 mm",
                    study="1.2.3", series="1.2.3.4", destinations=["pacs"])


def _counted(notifier: Notifier, outcome: str) -> float:
    return notifier.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "dicom_node_notices_total", {"webhook": "ops", "outcome": outcome}) or 0.0


def _assert_private(received: list[Received], secrets: set[str]) -> None:
    for post in received:
        text = (post.body.decode() + repr(post.headers)).lower()
        leaked = sorted(secret for secret in secrets if secret.lower() in text)
        assert not leaked, f"patient strings in a notice: {leaked}"


# -- the notifier on its own ------------------------------------------------------------


def test_a_notice_is_signed_over_timestamp_and_body_and_delivered_once(tmp_path, key_file):
    receiver = WebhookReceiver().start()
    notifier = _notifier(tmp_path, key_file, receiver.url)
    notifier.start()
    try:
        _notify(notifier)
        wait_until(lambda: notifier.delivered == 1, 30, 0.05, "the notice delivered")
        (post,) = receiver.received
        assert post.path == "/hook" and post.headers["content-type"] == "application/json"
        assert post.signed_by(KEY.encode()), post.headers
        assert not post.signed_by(b"another-key-0123456789abcdef"), "a signature any key verifies proves nothing"
        timestamp = int(post.headers["x-dicom-node-timestamp"])
        assert abs(timestamp - time.time()) < 60
        body = post.json()
        assert set(body) == {"event", "notice_id", "job_id", "state", "reason", "study_instance_uid",
                             "series_instance_uid", "destinations", "at", "node"}
        assert (body["event"], body["job_id"], body["state"], body["study_instance_uid"],
                body["series_instance_uid"], body["destinations"], body["node"]) == (
            "job_failed", 7, "failed", "1.2.3", "1.2.3.4", ["pacs"], "DICOMNODE")
        assert post.headers["x-dicom-node-event"] == "job_failed"
        assert post.headers["x-dicom-node-notice"] == body["notice_id"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["at"])
        # a body changed in transit no longer verifies
        tampered = Received(post.path, post.headers, post.body.replace(b'"job_id":7', b'"job_id":8'))
        assert tampered.body != post.body and not tampered.signed_by(KEY.encode())
        assert _counted(notifier, "delivered") == 1
    finally:
        notifier.close()
        receiver.stop()
    assert len(receiver.received) == 1 and notifier.attempts == 1


def test_notices_are_retried_while_the_receiver_is_down_and_arrive_once_when_it_is_back(tmp_path, key_file):
    receiver = WebhookReceiver()  # its port reserved, nothing listening yet
    notifier = _notifier(tmp_path, key_file, receiver.url)
    notifier.start()
    try:
        _notify(notifier, 1)
        _notify(notifier, 2, JobState.REVIEW)
        wait_until(lambda: notifier.attempts >= 2, 30, 0.05, "two failed attempts")
        assert notifier.delivered == 0 and notifier.waiting == 2
        assert notifier.metrics.registry.get_sample_value(  # type: ignore[union-attr]
            "dicom_node_notice_attempt_failures_total", {"webhook": "ops"}) >= 2
        receiver.start()
        wait_until(lambda: notifier.delivered == 2, 60, 0.05, "both notices delivered")
        received = receiver.received
        assert [post.json()["job_id"] for post in received] == [1, 2], "each once, oldest first"
        assert [post.json()["event"] for post in received] == ["job_failed", "job_review"]
        assert all(post.signed_by(KEY.encode()) for post in received)
        assert notifier.failed == 0 and notifier.waiting == 0
    finally:
        notifier.close()
        receiver.stop()
    assert len(receiver.received) == 2


def test_a_5xx_is_tried_again_a_4xx_is_not_and_holds_up_nothing(tmp_path, key_file):
    receiver = WebhookReceiver(statuses=[503, 400]).start()
    notifier = _notifier(tmp_path, key_file, receiver.url)
    notifier.start()
    try:
        _notify(notifier, 1)  # 503, then 400: refused for good after its second attempt
        _notify(notifier, 2)  # 200
        wait_until(lambda: notifier.delivered == 1 and notifier.failed == 1, 30, 0.05, "one refused, one delivered")
        ids = [post.json()["job_id"] for post in receiver.received]
        assert ids == [1, 1, 2], ids
        first, again = receiver.received[:2]
        assert first.body == again.body and first.headers["x-dicom-node-notice"] == again.headers[
            "x-dicom-node-notice"], "a retry is the same notice (a receiver can drop one it has seen)"
        assert (_counted(notifier, "failed"), _counted(notifier, "delivered")) == (1, 1)
    finally:
        notifier.close()
        receiver.stop()


def test_retries_end_after_retry_seconds(tmp_path, key_file):
    notifier = _notifier(tmp_path, key_file, f"http://127.0.0.1:{free_port()}/hook", retry_seconds=2)
    notifier.start()
    try:
        _notify(notifier)
        wait_until(lambda: notifier.failed == 1, 30, 0.05, "the notice given up")
        assert 2 <= notifier.attempts <= 4 and notifier.waiting == 0 and _counted(notifier, "failed") == 1
    finally:
        notifier.close()


def test_a_full_queue_drops_and_counts_and_notify_never_waits(tmp_path, key_file):
    notifier = _notifier(tmp_path, key_file, f"http://127.0.0.1:{free_port()}/hook")  # not started: nothing sent
    started = time.monotonic()
    for job_id in range(1005):
        _notify(notifier, job_id)
    assert time.monotonic() - started < 10
    assert (notifier.waiting, notifier.dropped, _counted(notifier, "dropped")) == (1000, 5, 5)


def test_the_webhook_settings(tmp_path, key_file, monkeypatch):
    base = {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}

    def refused(webhook: dict, phrase: str) -> None:
        with pytest.raises(ConfigError, match=phrase) as error:
            parse_config({**base, "notify": [webhook]}, tmp_path)
        assert KEY not in str(error.value) and "pw@" not in str(error.value), "a refused secret is never echoed"

    refused({"url": "http://x/hook", "secret": KEY}, "notify\\[0\\].secret: .*not written in the config")
    refused({"url": "http://x/hook"}, "give one of secret_file or secret_env")
    refused({"url": "https://x/hook", "secret_env": "K", "verify_tls": False}, "refused unless allow_insecure")
    refused({"url": "https://user:pw@x/hook", "secret_env": "K"}, "user or password inside the URL")
    refused({"url": "ftp://x", "secret_env": "K"}, "notify\\[0\\].url")
    refused({"url": "http://x", "secret_env": "K", "events": []}, "name at least one of failed, review, sent")
    refused({"url": "http://x", "secret_env": "K", "evnts": ["sent"]}, "unknown key; did you mean events")
    with pytest.raises(ConfigError, match="webhook name a is used twice"):
        parse_config({**base, "notify": [{"name": "a", "url": "http://x", "secret_env": "K"},
                                         {"name": "a", "url": "http://y", "secret_env": "K"}]}, tmp_path)
    config = parse_config({**base, "notify": [{"url": "http://x", "secret_file": "webhook.key"}]}, tmp_path)
    (webhook,) = config.notify
    assert webhook.secret_file == key_file and webhook.key() == KEY.encode()
    assert [e.value for e in webhook.events] == ["failed", "review"] and webhook.retry_seconds == 3600

    # start-up: one line naming the key, the unreadable-file exit status
    missing = parse_config({**base, "storage": {"spool_dir": str(tmp_path / "spool"),
                                                "state_db": str(tmp_path / "state.db")}, "node": {"port": free_port()},
                            "http": {"port": 0}, "notify": [{"url": "http://x", "secret_file": "gone.key"}]}, tmp_path)
    with pytest.raises(StartupError, match=r"^notify\[0\]\.secret_file: .*gone\.key cannot be read") as error:
        check_startup(missing)
    assert error.value.problem is StartupProblem.FILE_UNREADABLE and "\n" not in str(error.value)
    monkeypatch.setenv("SHORT_KEY", "short")
    short = missing.model_copy(update={"notify": (webhook.model_copy(update={"secret_file": None,
                                                                             "secret_env": "SHORT_KEY"}),)})
    with pytest.raises(StartupError, match=r"^notify\[0\]\.secret_env: .*shorter than 16 characters"):
        check_startup(short)


# -- through the processor's audit_end -------------------------------------------------


def _named_series(t1_dir: Path, folder: Path) -> Path:
    """Three instances of the T1 whose patient is ``Mustermann^Erika``, ID ``MRN778899``."""
    folder.mkdir(parents=True)
    for path in sorted(t1_dir.glob("*.dcm"))[:3]:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = f"{NAME}^{GIVEN}", PATIENT_ID
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


def test_audit_end_notifies_failed_review_and_sent_with_the_reason_masked_and_the_audit_off(tmp_path, key_file,
                                                                                            t1_dir):
    receiver = WebhookReceiver().start()
    config = _config(tmp_path, key_file, receiver.url, events=["failed", "review", "sent"])
    state, spool = StateStore(tmp_path / "state.db"), Spool(tmp_path / "spool")
    notifier = Notifier(config.notify, ae_title="DICOMNODE", metrics=Metrics())
    processor = Processor(config, state, spool, FakeSegmenter(), Metrics(state), Audit.off(), notifier=notifier)
    notifier.start()
    try:
        job_id = received_job(_named_series(t1_dir, tmp_path / "series"), state, spool)
        job = state.job(job_id)
        # a reason as a destination's error may word it, recorded as it came: the notice masks it
        leaking = f"pacs seg: send refused, not retried: no such patient {GIVEN} {NAME.upper()} ({PATIENT_ID})"
        for moved, event in ((JobState.FAILED, "job_failed"), (JobState.REVIEW, "job_review"),
                             (JobState.SENT, "job_sent"), (JobState.SKIPPED, None)):
            state.update_job(job_id, moved, JobUpdate(reason=leaking))
            assert processor.audit_end(job_id, moved) is moved
        received = receiver.wait_for(3)
        wait_until(lambda: notifier.delivered == 3, 30, 0.05, "three notices")
        assert [post.json()["event"] for post in received] == ["job_failed", "job_review", "job_sent"]
        for post in received:
            body = post.json()
            assert post.signed_by(KEY.encode())
            assert body["reason"] == "pacs seg: send refused, not retried: no such patient *** *** (***)"
            assert (body["job_id"], body["study_instance_uid"], body["series_instance_uid"]) == (
                job_id, job.series.study_instance_uid, job.series.series_instance_uid)
        _assert_private(received, {NAME, GIVEN, PATIENT_ID})
    finally:
        notifier.close()
        receiver.stop()
        state.close()
    assert len(receiver.received) == 3, "no notice for a skipped job"


# -- the node --------------------------------------------------------------------------


def _delivered(node: NodeProcess) -> float:
    text = requests.get(f"http://127.0.0.1:{node.config['http']['port']}/metrics", timeout=10).text
    found = re.search(r'^dicom_node_notices_total\{outcome="delivered",webhook="ops"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.peers
def test_a_failed_job_is_notified_signed_and_private_after_the_receiver_came_back(tmp_path, key_file, pacs,
                                                                                  phantom_weights, mri_dir):
    """A series with a missing slice fails at completion (no model runs); the receiver is
    down at first: the node retries and the notice arrives once, when it is back."""
    files = copy_series(mri_dir / GAP_SERIES, tmp_path / "series", seed=tmp_path.name)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    receiver = WebhookReceiver()  # down until the node has tried
    node = NodeProcess(tmp_path / "node", node_config(
        tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=phantom_weights,
        http={"port": free_port()},
        notify=[{"name": "ops", "url": receiver.url, "secret_file": str(key_file), "timeout_seconds": 5}],
    ))
    try:
        node.start()
        storescu(node.port, files)
        wait_until(lambda: log_has(node.log_path, "notify ops (") and "not delivered (" in node.log(), 120, 0.2,
                   "a failed attempt of the notice")
        receiver.start()
        (post,) = receiver.wait_for(1, 60)
        wait_until(lambda: _delivered(node) == 1, 30, 0.2, "the node to count the notice delivered")
        assert len(receiver.received) == 1
        assert post.signed_by(KEY.encode())
        body = post.json()
        (job,) = node.jobs()
        assert (body["event"], body["state"], body["job_id"], body["series_instance_uid"], body["node"]) == (
            "job_failed", "failed", job.id, series_uid, "DICOMNODE")
        assert "not whole" in body["reason"] and "gap of 9.60 mm" in body["reason"], body["reason"]
        patient = pydicom.dcmread(files[0], stop_before_pixels=True)
        _assert_private([post], patient_strings(mri_dir) | {
            str(patient.PatientName), str(patient.PatientID)} - {""})
    finally:
        code = node.stop()
        receiver.stop()
        shutil.rmtree(tmp_path / "series", ignore_errors=True)
    assert code == 0
    assert len(receiver.received) == 1, "delivered once, never again"


@pytest.mark.peers
def test_a_job_held_for_review_is_notified_with_its_held_destination(tmp_path, key_file, storescp, t1_dir, mri_dir):
    """The node in this process (a stand-in model), a destination with ``review: required``:
    the job waits for a reviewer, the receiver is told, nothing reaches the destination."""
    receiver = WebhookReceiver().start()
    config = parse_config({
        "node": {"port": free_port()},
        "security": {"allowed_callers": [{"ae_title": "MODALITY"}]},
        "destination": {"ae_title": storescp.ae_title, "host": "127.0.0.1", "port": storescp.port,
                        "review": "required"},
        "storage": {"min_free_bytes": 1_000_000},
        "completion": {"stable_seconds": 2},
        "http": {"port": 0},
        "notify": [{"name": "ops", "url": receiver.url, "secret_file": str(key_file)}],
    }, tmp_path)
    node = Node(config, segmenter=FakeSegmenter())
    node.start()
    try:
        files = sorted(t1_dir.glob("*.dcm"))
        storescu(config.node.port, files)
        (post,) = receiver.wait_for(1, 120)
        wait_until(lambda: node.notifier.delivered == 1, 30, 0.05, "the notice counted delivered")
        (job,) = node.state.jobs()
        assert job.state is JobState.REVIEW
        body = post.json()
        assert post.signed_by(KEY.encode())
        assert (body["event"], body["state"], body["job_id"], body["destinations"]) == (
            "job_review", "review", job.id, ["pacs"])
        assert body["series_instance_uid"] == str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        _assert_private([post], patient_strings(mri_dir))
        storescp.settle()
        assert storescp.receptions() == [], "held: nothing sent before a reviewer approves"
    finally:
        node.stop()
        receiver.stop()
    assert len(receiver.received) == 1
