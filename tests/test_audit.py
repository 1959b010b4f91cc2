"""The audit trail (``audit:``): what arrived from whom, what left for where, who pressed
"Process again", what retention deleted, in PS3.15 A.5 (IHE ATNA) terms, as JSON lines
and as RFC 5424 syslog over UDP; a full audit disk fails readiness, never a C-STORE."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node.audit import SYSLOG_MAX_BYTES, Audit, rfc5424
from dicom_node.config import AuditSettings, SyslogSettings, parse_config
from dicom_node.errors import ConfigError
from tests.conftest import patient_strings
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.inprocess import inprocess_node
from tests.support.node import UI_TOKEN, NodeProcess, node_config, ui_http
from tests.support.orthanc import Orthanc
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_until

# <PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG (RFC 5424, no structured data)
SYSLOG_LINE = re.compile(
    rb"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) (\d+) (\d{6}) - (\{.*\})$", re.S)


class UdpCollector:
    """A syslog collector: a UDP socket on 127.0.0.1 that keeps every datagram."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((LOCALHOST, 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.socket.recv(65535))
            except socket.timeout:
                continue

    def events(self) -> list[dict]:
        return [json.loads(SYSLOG_LINE.match(d).group(7)) for d in list(self.datagrams)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_events_are_json_lines_and_rfc5424_datagrams_split_to_fit(tmp_path):
    collector = UdpCollector()
    try:
        audit = Audit(AuditSettings(path=tmp_path / "audit.jsonl",
                                    syslog=SyslogSettings(host=LOCALHOST, port=collector.port)), ae_title="DICOMNODE")
        audit.start()
        sops = [f"1.2.826.0.1.3680043.8.498.{n}.{n * 7919}" for n in range(400)]  # ~17 KB of UIDs: two parts or more
        audit.record_association(accepted=False, calling_ae="INTRUDER", called_ae="DICOMNODE", address="127.0.0.1",
                                 port=4242, reason="calling AE title not recognised")
        audit.record_received(calling_ae="MODALITY", address="127.0.0.1", study="1.2.3", series="1.2.3.4",
                              received=sops, refused=[("1.2.3.4.9", 0xA900, "PixelData is missing")])
        audit.close()
        events = _lines(tmp_path / "audit.jsonl")
        assert [e["event"] for e in events] == ["Security Alert", "DICOM Instances Transferred"]
        alert, received = events
        assert (alert["event_id"], alert["event_type"], alert["outcome"]) == ("110113", "Node Authentication", 4)
        assert alert["who"] == {"ae_title": "INTRUDER", "address": "127.0.0.1", "port": 4242}
        assert (received["event_id"], received["action"], received["outcome"]) == ("110104", "C", 4)
        assert received["what"]["sop_instance_uids"] == sops and received["what"]["refused_count"] == 1
        assert received["what"]["refused"] == [{"sop_instance_uid": "1.2.3.4.9", "status": "0xA900"}]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", received["time"])

        wait_until(lambda: len(collector.datagrams) >= 3, 10, 0.05, "the syslog datagrams")
        assert all(len(d) <= SYSLOG_MAX_BYTES for d in collector.datagrams)
        parsed = [SYSLOG_LINE.match(d) for d in collector.datagrams]
        assert all(parsed), collector.datagrams[0][:200]
        assert {int(m.group(1)) for m in parsed} == {10 * 8 + 4}  # authpriv, warning (both are failures)
        assert {m.group(4) for m in parsed} == {b"dicom-node"}
        parts = [e for e in collector.events() if e["event"] == "DICOM Instances Transferred"]
        assert len(parts) >= 2 and [p["what"]["part"] for p in parts] == list(range(1, len(parts) + 1))
        assert [sop for p in parts for sop in p["what"]["sop_instance_uids"]] == sops
    finally:
        collector.close()


def test_a_short_event_is_one_datagram_with_the_notice_severity():
    event = {"time": "2025-01-02T03:04:05.000006Z", "event_id": "110100", "outcome": 0, "what": {}}
    [message] = rfc5424(event, facility=10, hostname="node1", app_name="dicom-node")
    assert message.startswith(b"<85>1 2025-01-02T03:04:05.000006Z node1 dicom-node ")
    assert SYSLOG_LINE.match(message)


def test_the_audit_settings(tmp_path):
    base = {"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
            "storage": {"state_db": "db/state.sqlite3"}}
    config = parse_config(base, tmp_path)
    assert config.audit.enabled and config.audit.path == tmp_path / "db" / "audit.jsonl"  # beside the database
    assert config.audit.syslog is None
    config = parse_config({**base, "audit": {"path": "trail/a.jsonl", "syslog": {"host": "collector"}}}, tmp_path)
    assert config.audit.path == tmp_path / "trail" / "a.jsonl"
    assert (config.audit.syslog.port, config.audit.syslog.facility) == (514, 10)
    with pytest.raises(ConfigError, match="audit.*sislog"):
        parse_config({**base, "audit": {"sislog": {"host": "collector"}}}, tmp_path)
    with pytest.raises(ConfigError, match="facility"):
        parse_config({**base, "audit": {"syslog": {"host": "collector", "facility": 24}}}, tmp_path)
    assert not Audit(parse_config({**base, "audit": {"enabled": False}}, tmp_path).audit, ae_title="X").enabled


@pytest.mark.peers
def test_a_full_audit_disk_fails_readiness_while_c_stores_succeed(tmp_path, t1_dir):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    pacs = StoreSCP(tmp_path / "pacs")
    node = inprocess_node(tmp_path / "node", pacs, audit={"path": "/dev/full"},
                          completion={"stable_seconds": 30, "complete_on_release": False})
    node.start()
    try:
        url = f"http://{LOCALHOST}:{node.config.http.port}/readyz"
        files = sorted(t1_dir.glob("*.dcm"))[:5]
        storescu(node.config.node.port, files)  # raises unless every C-STORE succeeded
        assert node.state.instance_count(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID) == 5
        failing = wait_until(lambda: (r := requests.get(url, timeout=10)).status_code == 503
                             and r.json()["failing"].get("audit") and r.json()["failing"], 15, 0.2,
                             "readiness to fail on the audit")
        assert "No space left on device" in failing["audit"] and "/dev/full" in failing["audit"]
        assert "scp" not in failing and "database" not in failing
    finally:
        node.stop()


@pytest.mark.peers
@pytest.mark.e2e
def test_an_orthanc_round_trip_leaves_its_events_in_order_without_a_patient_string(tmp_path, phantom_weights, t1_dir,
                                                                                     mri_dir):
    collector = UdpCollector()
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port).start()
    folder = tmp_path / "node"
    config = node_config(folder, destination=(orthanc.ae_title, orthanc.dicom_port), weights_dir=phantom_weights,
                         http=ui_http(folder),
                         # sent jobs kept 10 s, then deleted by the node's own retention (run every second)
                         retention={"days": 10 / 86400, "interval_seconds": 1},
                         audit={"syslog": {"host": LOCALHOST, "port": collector.port}})
    config["node"]["port"] = node_port
    node = NodeProcess(folder, config)
    audit_path = folder / "audit.jsonl"  # the default: beside storage.state_db
    try:
        node.start()
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(t1_dir.glob("*.dcm"))]
        study, series = headers[0].StudyInstanceUID, headers[0].SeriesInstanceUID
        sops = {str(h.SOPInstanceUID) for h in headers}
        storescu(node.port, t1_dir)
        with pytest.raises(RuntimeError):
            storescu(node.port, sorted(t1_dir.glob("*.dcm"))[:1], calling="INTRUDER")
        [first] = wait_until(lambda: [j for j in node.jobs() if j.state.value == "sent"] or None, 300, 0.5,
                             "the T1 series segmented and sent to Orthanc")
        retry = requests.post(f"http://{LOCALHOST}:{config['http']['port']}/api/jobs/{first.id}/retry",
                              headers={"Authorization": f"Bearer {UI_TOKEN}"}, timeout=30)
        assert retry.status_code == 202, retry.text
        again = retry.json()["job"]
        wait_until(lambda: any(j.id == again and j.state.value == "sent" for j in node.jobs()), 300, 0.5,
                   "the job processed again and sent")
        assert orthanc.get("/series") and len(orthanc.get("/series")) >= 1
        wait_until(lambda: any(e["event"] == "DICOM Study Deleted" for e in _lines(audit_path)), 60, 0.5,
                   "retention to delete the series")
        assert node.stop() == 0
        events = _lines(audit_path)
        text = audit_path.read_text(encoding="utf-8")
    finally:
        if node.process is not None:
            node.stop()
        orthanc.stop()
        collector.close()

    def first_index(predicate, after: int = -1) -> int:
        return next(i for i, e in enumerate(events) if i > after and predicate(e))

    start = first_index(lambda e: e["event_type"] == "Application Start")
    login = first_index(lambda e: e["event_type"] == "Login" and e["who"]["ae_title"] == "MODALITY", start)
    received = first_index(lambda e: e["event"] == "DICOM Instances Transferred" and e["action"] == "C", login)
    alert = first_index(lambda e: e["event"] == "Security Alert" and e["who"].get("ae_title") == "INTRUDER")
    sent = first_index(lambda e: e["event"] == "DICOM Instances Transferred" and e["action"] == "R", received)
    ended = first_index(lambda e: e["what"].get("job_state") == "sent" and e["what"]["job_id"] == first.id, sent)
    page = first_index(lambda e: e["what"].get("page_action") == "retry", ended)
    resent = first_index(lambda e: e["event"] == "DICOM Instances Transferred" and e["action"] == "R", page)
    ended_again = first_index(lambda e: e["what"].get("job_state") == "sent" and e["what"]["job_id"] == again, resent)
    deleted = first_index(lambda e: e["event"] == "DICOM Study Deleted", ended_again)
    stop = first_index(lambda e: e["event_type"] == "Application Stop", deleted)
    assert start < login < received < sent < ended < page < resent < ended_again < deleted < stop and alert > start

    def uids(i: int) -> tuple:
        return events[i]["what"]["study_instance_uid"], events[i]["what"]["series_instance_uid"]

    assert events[start]["what"]["config_sha256"] and events[start]["who"]["role"] == "node"
    assert events[login]["who"]["address"] == LOCALHOST and events[login]["outcome"] == 0
    assert uids(received) == (study, series) and set(events[received]["what"]["sop_instance_uids"]) == sops
    assert events[received]["outcome"] == 0 and events[received]["who"]["ae_title"] == "MODALITY"
    assert events[alert]["outcome"] == 4 and events[alert]["event_type"] == "Node Authentication"
    for i in (sent, resent):
        assert events[i]["outcome"] == 0 and events[i]["peer"]["destination"] == "pacs"
        assert events[i]["what"]["study_instance_uid"] == study
        assert events[i]["what"]["series_instance_uid"] not in (None, series)  # the SEG's own series
        assert events[i]["what"]["sop_instance_uids"] and events[i]["what"]["object"] == "seg"
    assert uids(ended) == uids(ended_again) == (study, series) and events[ended]["outcome"] == 0
    assert events[ended_again]["what"]["reprocess_of"] == first.id
    assert events[page]["who"] == {"address": LOCALHOST, "role": "status page"} and events[page]["outcome"] == 0
    assert (events[page]["what"]["job_id"], events[page]["what"]["new_job"]) == (first.id, again)
    assert uids(page) == (study, series)
    assert uids(deleted) == (study, series) and set(events[deleted]["what"]["sop_instance_uids"]) == sops
    assert sorted(events[deleted]["what"]["jobs"]) == sorted([first.id, again]) and events[deleted]["action"] == "D"

    # no patient string, in the file or what syslog received
    secrets = patient_strings(mri_dir)
    for header in headers[:1]:
        names = re.split(r"[\^ ]", str(header.PatientName))
        secrets |= {str(header.PatientID)} | {part for part in names if len(part) >= 3}
    received_text = b"\n".join(collector.datagrams).decode("utf-8", "replace")
    for secret in secrets:
        assert secret.lower() not in text.lower() and secret.lower() not in received_text.lower(), "a patient string"
    # syslog got every event (a long one in parts) as RFC 5424
    assert all(SYSLOG_LINE.match(d) for d in collector.datagrams)
    by_syslog = {(e["time"], e["event"]) for e in collector.events()}
    assert sorted(by_syslog) == sorted({(e["time"], e["event"]) for e in events})
