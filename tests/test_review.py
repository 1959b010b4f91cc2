"""Review before sending (``review: required``): held objects, approval, rejection with a
reason, expiry, and the settle rules, on a real state store; then the review view in
headless Chromium against a node that runs the phantom model and sends to counting
dcmtk storage SCPs: the slices with the overlay, approval sending exactly one SEG,
rejection sending nothing to the held destination while a second, not held destination
of the same job receives its SEG, and both actions refused (401) without the token."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest
import requests

from dicom_node.audit import Audit
from dicom_node.config import AuditSettings, parse_config
from dicom_node.store.retention import period_days
from dicom_node.store.state import (
    JobState,
    JobUpdate,
    OutboxState,
    ReviewDecision,
    SeriesRef,
    StateStore,
)
from dicom_node.work.review import ReviewRefused, Reviews
from tests.conftest import patient_strings
from tests.support.wait import wait_until

DAY = 86400.0


# -- the state store ----------------------------------------------------------------------------

def _store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state.db")


def _job(state: StateStore, tmp_path: Path, items: list[tuple[str, str]], held: set[str], *, series: str = "1.2.3.1",
         now: float = 100.0) -> int:
    """A job of a one-instance series, processed, with its outbox rows (destination, object)."""
    state.record_instance(SeriesRef("1.2.3", series, "MODALITY", tmp_path), series + ".1", "1.2", tmp_path / "a",
                          now=now - 10)
    job = state.complete_series(series, now=now - 5)
    assert state.claim_next_processing(now=now - 4).id == job
    for _, key in items:
        (tmp_path / key).mkdir(exist_ok=True)
    assert state.start_sending(job, [(destination, key, tmp_path / key) for destination, key in items],
                               JobUpdate(result_path=tmp_path / "seg" / "1.dcm", reason="segmented 3 structures"),
                               held=held, now=now)
    return job


def _row(state: StateStore, job: int, destination: str):
    return next(item for item in state.outbox(job) if item.destination == destination)


def test_a_job_whose_every_object_is_held_waits_in_review_until_approved_then_sends(tmp_path):
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"})
    assert state.job(job).state is JobState.REVIEW
    assert [item.state for item in state.outbox(job)] == [OutboxState.HELD]
    assert state.claim_next_send(now=1e12) is None  # nothing held is ever claimed for sending
    assert state.next_wakeup() is None
    assert state.outbox_counts()["pacs"].held == 1 and state.outbox_counts()["pacs"].pending == 0
    assert [j.id for j in state.awaiting_review()] == [job]
    assert state.review(job).held_at == 100.0 and state.review(job).decision is None

    assert state.approve(job, "address 127.0.0.1, role status page", now=200) is JobState.SENDING
    assert state.review(job).decision is ReviewDecision.APPROVED and state.review(job).decided_at == 200
    assert state.review(job).reviewer == "address 127.0.0.1, role status page"
    item = state.claim_next_send(now=200)
    assert item is not None and item.destination == "pacs" and item.state is OutboxState.PENDING
    assert state.record_send(item.id, ok=True, now=201) is JobState.SENT
    assert state.job(job).sent_at == 201 and state.awaiting_review() == []
    with pytest.raises(ValueError, match="no objects waiting for review"):
        state.approve(job, "someone")  # decided once


def test_a_destination_not_held_sends_at_once_and_the_job_moves_to_review_when_only_held_rows_remain(tmp_path):
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg"), ("research", "seg")], held={"pacs"})
    assert state.job(job).state is JobState.SENDING  # the research archive is not held
    item = state.claim_next_send(now=100)
    assert item.destination == "research"
    assert state.claim_next_send(now=100, destination="pacs") is None
    assert state.record_send(item.id, ok=True, now=101) is JobState.REVIEW
    assert state.job(job).state is JobState.REVIEW and state.job(job).sent_at is None

    assert state.reject(job, "  the kidneys are  outlined on the liver ", "user anna, role command line",
                        now=300) is JobState.REJECTED
    ended = state.job(job)
    assert ended.reason == "segmented 3 structures; rejected by review: the kidneys are outlined on the liver"
    assert _row(state, job, "pacs").state is OutboxState.REJECTED
    assert _row(state, job, "research").state is OutboxState.SENT
    review = state.review(job)
    assert review.decision is ReviewDecision.REJECTED and review.reason == "the kidneys are outlined on the liver"
    assert state.claim_next_send(now=1e12) is None
    # a rejected job can be processed again (a new job, held again for review)
    again = state.reprocess(job, now=400)
    assert again.state is JobState.RECEIVED and again.reprocess_of == job


def test_a_rejection_with_a_send_still_running_ends_when_it_does_and_a_failed_send_wins(tmp_path):
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg"), ("research", "seg")], held={"pacs"})
    with pytest.raises(ValueError, match="needs a reason"):
        state.reject(job, "   ", "someone")
    assert state.reject(job, "wrong series", "someone", now=150) is JobState.SENDING  # research still pending
    research = state.claim_next_send(now=150)
    assert state.record_send(research.id, ok=False, error="send refused, not retried: 0xA700", now=151) \
        is JobState.FAILED
    failed = state.job(job)
    assert "rejected by review: wrong series" in failed.reason and "send failed: research seg" in failed.reason
    # retry sends the failed row only; once it is sent the job is what the reviewer decided
    assert state.requeue(job, now=160).state is JobState.SENDING
    assert _row(state, job, "pacs").state is OutboxState.REJECTED
    assert state.record_send(state.claim_next_send(now=160).id, ok=True, now=161) is JobState.REJECTED
    assert state.job(job).reason == "segmented 3 structures; rejected by review: wrong series"


def test_an_approval_while_another_destination_still_sends(tmp_path):
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg"), ("pacs", "overlay"), ("research", "seg")], held={"pacs"})
    assert state.approve(job, "someone", now=120) is JobState.SENDING
    assert {item.state for item in state.outbox(job)} == {OutboxState.PENDING}
    states = [state.record_send(item.id, ok=True, now=130) for item in state.outbox(job)]
    assert states == [JobState.SENDING, JobState.SENDING, JobState.SENT]


def test_unreviewed_objects_expire_after_the_configured_days(tmp_path):
    state = _store(tmp_path)
    old = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"}, series="1.2.3.1", now=1000.0)
    fresh = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"}, series="1.2.3.2", now=1000.0 + 10 * DAY)
    sending = _job(state, tmp_path, [("pacs", "seg"), ("research", "seg")], held={"pacs"}, series="1.2.3.3",
                   now=1000.0)
    now = 1000.0 + 14 * DAY + 1
    assert state.expire_reviews(0, now=now) == []  # 0: never
    assert state.expire_reviews(14, now=now) == [(old, JobState.EXPIRED), (sending, JobState.SENDING)]
    assert state.job(old).state is JobState.EXPIRED and "review expired: not reviewed within 14 day(s)" in \
        state.job(old).reason
    assert _row(state, old, "pacs").state is OutboxState.EXPIRED
    assert state.review(old).decision is ReviewDecision.EXPIRED and state.review(old).reviewer is None
    assert state.job(fresh).state is JobState.REVIEW
    # the job still sending to research ends expired once that send is done
    research = _row(state, sending, "research")
    assert state.record_send(research.id, ok=True, now=now + 1) is JobState.EXPIRED
    assert state.expire_reviews(14, now=now + DAY) == []  # each expires once
    with pytest.raises(ValueError):
        state.approve(old, "too late")


def test_review_jobs_are_open_superseded_by_a_grown_series_and_kept_from_retention(tmp_path):
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"})
    assert state.ended_series() == []  # a job waiting for review keeps its series
    state.record_instance(SeriesRef("1.2.3", "1.2.3.1", "MODALITY", tmp_path), "1.2.3.1.2", "1.2", tmp_path / "b",
                          now=110)
    newer = state.complete_series("1.2.3.1", now=120)
    assert state.job(job).state is JobState.SUPERSEDED and newer is not None
    assert state.awaiting_review() == []
    with pytest.raises(ValueError, match="superseded"):
        state.approve(job, "someone")
    with pytest.raises(KeyError):
        state.approve(9999, "someone")
    settings = parse_config({"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                             "retention": {"failed_days": 7}}, tmp_path).retention
    assert period_days(settings, JobState.REJECTED) == period_days(settings, JobState.EXPIRED) == 7


def test_a_database_of_an_earlier_release_gets_the_reviews_table(tmp_path):
    state = _store(tmp_path)
    state.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("DROP TABLE reviews")
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"})
    assert state.review(job) is not None


def test_the_config_names_the_held_destinations_and_the_expiry(tmp_path):
    config = parse_config({"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "review": "required"},
        {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": 105}],
        "review": {"expire_days": 3}}, tmp_path)
    assert [d.review for d in config.destinations] == ["required", "none"]
    assert config.review.expire_days == 3
    assert parse_config({"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
                        tmp_path).review.expire_days == 14
    from dicom_node.errors import ConfigError

    with pytest.raises(ConfigError, match="review"):
        parse_config({"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "review": "maybe"}},
                     tmp_path)
    with pytest.raises(ConfigError, match="review"):
        parse_config({"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                      "review": {"expire_days": 3, "after": 2}}, tmp_path)


def test_decisions_are_audited_the_reason_masked_and_each_outcome_handed_on(tmp_path, t1_dir, mri_dir):
    """``Reviews``: the reviewer's reason goes through the patient mask of the series; each
    decision is an audit event; outcomes go to ``ended`` (the node's audit_end)."""
    state = _store(tmp_path)
    source = sorted(t1_dir.glob("*.dcm"))[0]
    state.record_instance(SeriesRef("1.2.3", "1.2.3.1", "MODALITY", t1_dir), "1.2.3.1.1", "1.2", source, now=90)
    job = state.complete_series("1.2.3.1", now=95)
    state.claim_next_processing(now=96)
    state.start_sending(job, [("pacs", "seg", tmp_path)], JobUpdate(reason="made"), held={"pacs"}, now=100)
    audit = Audit(AuditSettings(path=tmp_path / "audit.jsonl"), ae_title="NODE")
    audit.start()
    ended, woken = [], []
    reviews = Reviews(state, audit=audit, ended=lambda job_id, s: ended.append((job_id, s)) or s,
                      wake=woken.append)
    import pydicom

    name = str(pydicom.dcmread(source, stop_before_pixels=True).PatientName)
    assert len(name) >= 3
    with pytest.raises(ReviewRefused) as refused:
        reviews.reject(4242, "no such job", {"address": "127.0.0.1"})
    assert refused.value.missing
    assert reviews.reject(job, f"this is {name}'s old study", {"address": "127.0.0.1", "role": "status page"}) \
        is JobState.REJECTED
    assert ended == [(job, JobState.REJECTED)] and woken == []
    assert name not in state.job(job).reason and "this is ***'s old study" in state.job(job).reason
    audit.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    [event] = [e for e in events if e["what"].get("review")]
    assert event["event"] == "DICOM Instances Accessed" and event["action"] == "U" and event["outcome"] == 0
    assert event["what"] == {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.1", "job_id": job,
                             "review": "rejected"}
    assert event["who"] == {"address": "127.0.0.1", "role": "status page"}
    text = (tmp_path / "audit.jsonl").read_text()
    assert not any(secret in text for secret in patient_strings(mri_dir))


# -- the review view in a browser, against a node running the phantom model ----------------------

from tests.derived import copy_series  # noqa: E402
from tests.support.asserts import assert_exactly_one_seg, seg_receptions, series_uid_of  # noqa: E402
from tests.support.chromium import start_chromium  # noqa: E402
from tests.support.dcmtk import StoreSCP, storescu  # noqa: E402
from tests.support.node import UI_READ_TOKEN, UI_TOKEN, NodeProcess, node_config, ui_http  # noqa: E402

READ = {"Authorization": f"Bearer {UI_READ_TOKEN}"}
ACT = {"Authorization": f"Bearer {UI_TOKEN}"}
# the pixels of a plane that are coloured (a structure drawn over grey), in the browser
_COLOURED_PIXELS = """
const img = arguments[0];
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
let coloured = 0;
for (let i = 0; i < data.length; i += 4) {
  if (Math.max(data[i], data[i + 1], data[i + 2]) - Math.min(data[i], data[i + 1], data[i + 2]) > 40) coloured++;
}
return coloured;
"""


@pytest.fixture(scope="module")
def review_node(tmp_path_factory, phantom_weights):
    """A node whose ``pacs`` (a counting storescp) has ``review: required`` and whose
    ``research`` archive (another one) has not, with the status page on."""
    folder = tmp_path_factory.mktemp("review")
    pacs, research = StoreSCP(folder / "pacs").start(), StoreSCP(folder / "research", ae_title="RESEARCH").start()
    config = node_config(folder / "node", destination=(pacs.ae_title, pacs.port), weights_dir=phantom_weights,
                         http=ui_http(folder / "node"), review={"expire_days": 14})
    del config["destination"]
    config["destinations"] = [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port, "review": "required"},
        {"name": "research", "ae_title": research.ae_title, "host": "127.0.0.1", "port": research.port},
    ]
    node = NodeProcess(folder / "node", config).start()
    try:
        yield node, pacs, research, folder
    finally:
        node.stop(signal.SIGKILL)
        pacs.stop()
        research.stop()


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium((1400, 1000))
    yield driver
    driver.quit()


def _url(node: NodeProcess, path: str) -> str:
    return f"http://127.0.0.1:{node.config['http']['port']}{path}"


def _wait(driver, predicate, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d), message=what)


def _job_of(node: NodeProcess, series_uid: str, state: JobState):
    return next((job for job in node.jobs()
                 if job.series.series_instance_uid == series_uid and job.state is state), None)


def _send_series(node: NodeProcess, research: StoreSCP, source: Path, folder: Path, seed: str):
    """A copy of ``source`` (new UIDs) sent to the node; its job once it waits for review,
    after the research archive (not held) received its one SEG."""
    paths = copy_series(source, folder / seed, seed)
    uid = series_uid_of(paths[0])
    storescu(node.port, paths)
    job = wait_until(lambda: _job_of(node, uid, JobState.REVIEW), 300, 1, f"series {seed} waiting for review")
    assert_exactly_one_seg(research, uid)  # the research archive is not held
    return job, uid


def _token(driver, token: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token + Keys.ENTER)


@pytest.mark.e2e
@pytest.mark.peers
def test_a_reviewer_scrolls_the_overlay_and_approves_and_exactly_one_seg_arrives(review_node, browser, t1_dir,
                                                                              mri_dir):
    from selenium.webdriver.common.by import By

    node, pacs, research, folder = review_node
    job, uid = _send_series(node, research, t1_dir, folder, "review-approve")
    pacs.settle()
    assert pacs.receptions() == [], "nothing reaches a review: required destination before approval"
    assert [(item.destination, item.state) for item in _outbox(node, job.id)] == [
        ("pacs", OutboxState.HELD), ("research", OutboxState.SENT)]
    listed = node.cli("review", "list")
    assert listed.returncode == 0 and f"job {job.id} (review)" in listed.stdout and "seg to pacs" in listed.stdout
    status = node.cli("status")
    assert "review: 1" in status.stdout and "1 held for review" in status.stdout

    # without the token: the view's data and both actions refused, nothing changes
    assert requests.get(_url(node, f"/api/jobs/{job.id}/review"), timeout=30).status_code == 401
    assert requests.get(_url(node, f"/api/jobs/{job.id}/review/3.png"), timeout=30).status_code == 401
    assert requests.post(_url(node, f"/api/jobs/{job.id}/approve"), timeout=30).status_code == 401
    assert requests.post(_url(node, f"/api/jobs/{job.id}/reject"), headers={"X-Review-Reason": "no"},
                         timeout=30).status_code == 401
    assert requests.post(_url(node, f"/api/jobs/{job.id}/approve"), headers=READ, timeout=30).status_code == 403
    assert _job_of(node, uid, JobState.REVIEW) is not None

    # the read-only token: the slices with the overlay, scrollable, and no decision
    browser.get(_url(node, f"/review/{job.id}"))
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-review-status"), "the first read")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-review-status") == "401"
    _token(browser, UI_READ_TOKEN)
    browser.get(_url(node, "/"))  # the status page links a job waiting for review to its view
    links = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"#job-{job.id} a.review"), "the review link")
    assert links[0].get_attribute("href").endswith(f"/review/{job.id}")
    assert _wait(browser, lambda d: d.find_element(By.ID, f"job-{job.id}").get_attribute("data-state") == "review",
                 "the job in review on the status page")
    links[0].click()
    _wait(browser, lambda d: d.current_url.endswith(f"/review/{job.id}"), "the review view")
    image = browser.find_element(By.ID, "plane")
    _wait(browser, lambda d: image.get_attribute("data-plane") and d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", image), "the first plane", timeout=60)
    view = requests.get(_url(node, f"/api/jobs/{job.id}/review"), headers=READ, timeout=60).json()
    assert view["planes"] == 35 and view["seg"] and view["labelled"] and view["waiting"] and not view["can_act"]
    first = int(image.get_attribute("data-plane"))
    assert first in view["labelled"], "the view opens on a segmented plane"
    assert browser.execute_script(_COLOURED_PIXELS, image) > 50, "the segmentation is drawn over the slice"
    assert image.get_attribute("src").startswith("blob:"), "fetched with the token, never a token in a URL"
    assert browser.find_element(By.ID, "approve").get_attribute("disabled") is not None
    source = image.get_attribute("src")
    for _ in range(3):  # the mouse wheel over the image scrolls through the series
        browser.execute_script("arguments[0].dispatchEvent(new WheelEvent('wheel', {deltaY: 100, bubbles: true,"
                               " cancelable: true}))", image)
    _wait(browser, lambda d: image.get_attribute("data-plane") == str(first + 3), "three planes on")
    assert image.get_attribute("src") != source
    assert browser.find_element(By.ID, "plane-label").text.startswith(f"plane {first + 4} of 35")
    wheeled = image.get_attribute("src")
    browser.execute_script("const s = arguments[0]; s.value = '0'; s.dispatchEvent(new Event('input'));",
                           browser.find_element(By.ID, "slider"))  # the slider: to the first plane
    _wait(browser, lambda d: image.get_attribute("data-plane") == "0", "the first plane")
    assert image.get_attribute("src") not in (source, wheeled)
    planes = [requests.get(_url(node, f"/api/jobs/{job.id}/review/{k}.png"), headers=READ, timeout=60)
              for k in (first, first + 1)]
    assert all(p.status_code == 200 and p.headers["Content-Type"] == "image/png" for p in planes)
    assert planes[0].content != planes[1].content
    text = browser.page_source + json.dumps(view)
    assert not [secret for secret in patient_strings(mri_dir) if secret in text]

    # the action token: approve sends the held SEG, exactly once
    _token(browser, UI_TOKEN)
    approve = browser.find_element(By.ID, "approve")
    _wait(browser, lambda d: approve.get_attribute("disabled") is None, "the approve button enabled")
    approve.click()
    message = browser.find_element(By.ID, "message")
    _wait(browser, lambda d: message.get_attribute("data-status"), "the answer to the approval")
    assert message.get_attribute("data-status") == "202", message.text
    wait_until(lambda: _job_of(node, uid, JobState.SENT), 60, 0.5, "the approved job sent")
    assert_exactly_one_seg(pacs, uid)
    assert len(pacs.receptions()) == 1
    assert requests.post(_url(node, f"/api/jobs/{job.id}/approve"), headers=ACT, timeout=30).status_code == 409
    pacs.settle()
    assert len(pacs.receptions()) == 1, "approving again sends nothing"
    _wait(browser, lambda d: d.find_element(By.ID, "job-state").text == "sent", "the view shows the job sent")
    browser.save_screenshot(str(folder / "review-approved.png"))
    events = wait_until(lambda: [e for e in _audit(node) if e["what"].get("review") == "approved"] and _audit(node),
                        30, 0.5, "the approval in the audit trail")
    assert [e["what"]["review"] for e in events if e["what"].get("review") and e["outcome"] == 0] == ["approved"]
    refused = [e for e in events if e["event"] == "Security Alert"]
    assert {e["what"]["http_status"] for e in refused} == {401, 403} and all(
        e["event_type"] == "Use of Restricted Function" for e in refused)


@pytest.mark.e2e
@pytest.mark.peers
def test_a_rejected_job_sends_nothing_to_the_held_destination_and_records_the_reason(review_node, browser, t1_dir):
    from selenium.webdriver.common.by import By

    node, pacs, research, folder = review_node
    pacs.settle()
    before = len(pacs.receptions())
    job, uid = _send_series(node, research, t1_dir, folder, "review-reject")
    browser.get(_url(node, f"/review/{job.id}"))
    _token(browser, UI_TOKEN)
    reject = browser.find_element(By.ID, "reject")
    _wait(browser, lambda d: reject.get_attribute("disabled") is None, "the reject button enabled")
    message = browser.find_element(By.ID, "message")
    reject.click()  # without a reason: refused by the page, nothing asked
    _wait(browser, lambda d: "needs a reason" in message.text, "the page asks for a reason")
    assert requests.post(_url(node, f"/api/jobs/{job.id}/reject"), headers=ACT, timeout=30).status_code == 400
    assert _job_of(node, uid, JobState.REVIEW) is not None
    browser.find_element(By.ID, "reason").send_keys("the brain mask leaks into the scalp")
    reject.click()
    _wait(browser, lambda d: message.get_attribute("data-status"), "the answer to the rejection")
    assert message.get_attribute("data-status") == "200", message.text
    rejected = wait_until(lambda: _job_of(node, uid, JobState.REJECTED), 30, 0.5, "the job rejected")
    assert rejected.reason.endswith("; rejected by review: the brain mask leaks into the scalp")
    assert [(item.destination, item.state) for item in _outbox(node, job.id)] == [
        ("pacs", OutboxState.REJECTED), ("research", OutboxState.SENT)]
    _wait(browser, lambda d: d.find_element(By.ID, "job-state").text == "rejected", "the view shows it rejected")
    # a wrong send would have come by now: the node's send threads poll every 5 s
    with pytest.raises(TimeoutError):
        wait_until(lambda: seg_receptions(pacs, uid), 7, 0.5, "a rejected SEG at pacs")
    pacs.settle()
    assert len(pacs.receptions()) == before and seg_receptions(pacs, uid) == [], "a rejected SEG was sent"
    assert_exactly_one_seg(research, uid)
    assert requests.post(_url(node, f"/api/jobs/{job.id}/reject"), headers={**ACT, "X-Review-Reason": "again"},
                         timeout=30).status_code == 409
    events = wait_until(lambda: [e for e in _audit(node) if e["what"].get("job_id") == job.id and e["outcome"] == 0
                                 and e["what"].get("job_state") == "rejected"] and
                        [e for e in _audit(node) if e["what"].get("job_id") == job.id and e["outcome"] == 0],
                        30, 0.5, "the rejection in the audit trail")
    assert [(e["what"]["review"], e["reason"]) for e in events if e["what"].get("review")] == [
        ("rejected", "the brain mask leaks into the scalp")]
    assert any(e["what"].get("job_state") == "rejected" for e in events), "the job's end is audited"


def _outbox(node: NodeProcess, job_id: int):
    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        return state.outbox(job_id)
    finally:
        state.close()


def _audit(node: NodeProcess) -> list[dict]:
    path = Path(node.config["storage"]["state_db"]).with_name("audit.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_review_command_lists_rejects_and_approves_with_an_audit_event(tmp_path):
    import subprocess
    import sys

    import yaml

    config = {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                                "review": "required"}],
              "storage": {"state_db": str(tmp_path / "state.db"), "spool_dir": str(tmp_path / "spool")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    state = _store(tmp_path)
    rejected = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"}, series="1.2.3.1")
    approved = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"}, series="1.2.3.2")
    state.close()

    def review(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node", "review", *args,
                               "--config", str(tmp_path / "config.yaml")], capture_output=True, text=True, timeout=120)

    listed = review("list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[1] for line in listed.stdout.splitlines()] == [str(rejected), str(approved)]
    assert "seg to pacs" in listed.stdout and "expires in" in listed.stdout
    assert [json.loads(line)["id"] for line in review("list", "--json").stdout.splitlines()] == [rejected, approved]
    assert review("reject", str(rejected)).returncode == 2  # --reason is required
    done = review("reject", str(rejected), "--reason", "wrong side")
    assert done.returncode == 0 and "rejected: rejected" in done.stdout, done.stderr
    assert review("approve", str(approved)).returncode == 0
    again = review("approve", str(rejected))
    assert again.returncode == 1 and "no objects waiting for review" in again.stderr
    assert review("list").stdout.strip() == "no job waits for review"
    state = _store(tmp_path)
    assert state.job(rejected).state is JobState.REJECTED and state.job(approved).state is JobState.SENDING
    assert state.review(rejected).reviewer.endswith("role command line")
    state.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["what"].get("review"), e["who"].get("role")) for e in events if e["what"].get("review")] == [
        ("rejected", "command line"), ("approved", "command line")]
    assert [e["what"]["job_state"] for e in events if "job_state" in e["what"]] == ["rejected"]


def test_the_node_expires_unreviewed_jobs_through_audit_end(tmp_path):
    state = _store(tmp_path)
    job = _job(state, tmp_path, [("pacs", "seg")], held={"pacs"}, now=1000.0)
    ended = []
    reviews = Reviews(state, ended=lambda job_id, s: ended.append((job_id, s)) or s)
    assert reviews.expire(0) == []  # 0: never
    assert state.job(job).state is JobState.REVIEW
    assert reviews.expire(14) == [job]  # held at t=1000 s (1970): long past 14 days
    assert state.job(job).state is JobState.EXPIRED and ended == [(job, JobState.EXPIRED)]
    assert reviews.expire(14) == [] and len(ended) == 1


def test_a_review_plane_is_drawn_as_the_overlay_series_draws_it(t1_dir, tmp_path):
    """The review view's picture of a plane is the overlay series' image of it (the image
    part, without legend and text), from the SEG read back: the same window, fill,
    outline and colours (to the CIELab round trip of the SEG's colours)."""
    import io

    import numpy as np
    import pydicom
    from PIL import Image

    from pipeline.outputs.options import OutputRequest
    from pipeline.process import process_series
    from pipeline.review import load_review_stack
    from pipeline.settings import PipelineSettings
    from tests.test_worker import FakeSegmenter

    paths = sorted(t1_dir.glob("*.dcm"))
    result = process_series(paths, PipelineSettings(), FakeSegmenter(90), [OutputRequest("seg"),
                                                                           OutputRequest("overlay")])
    objects = {obj.key: obj for obj in result.objects}
    seg = tmp_path / "seg.dcm"
    objects["seg"].datasets[0].save_as(seg, enforce_file_format=True)
    stack = load_review_stack(paths, seg)
    assert stack.count == len(paths) and stack.labelled_planes() == [5, 6, 7, 8, 9]
    for index in (0, 7):
        overlay = objects["overlay"].datasets[index]
        expected = overlay.pixel_array[:stack.grey.shape[1], :stack.grey.shape[2]].astype(int)
        drawn = np.asarray(Image.open(io.BytesIO(stack.png(index))).convert("RGB")).astype(int)
        assert drawn.shape == expected.shape
        assert np.abs(drawn - expected).max() <= 3, f"plane {index} differs from the overlay series"
    assert stack.count == len({str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths})
    with pytest.raises(IndexError):
        stack.png(stack.count)
