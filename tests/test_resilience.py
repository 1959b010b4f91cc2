"""Unattended operation with real processes: crashes (kill -9), a PACS that is down,
concurrent senders, a full disk, malformed input. Each series must end with exactly
one SEG at the destination (counted per C-STORE received, so that a second delivery of
the same SOP instance counts), none lost, none duplicated."""

from __future__ import annotations

import copy
import os
import random
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from dicom_node.store.state import JobState
from tests.segcheck import check_seg_against_source
from tests.support.asserts import (
    assert_exactly_one_seg,
    assert_no_conflicting_duplicates,
    seg_receptions,
    series_uid_of,
)
from tests.support.dcmtk import storescu
from tests.support.node import node_fixture, node_settled
from tests.support.paths import LOCALHOST
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.peers]

node = node_fixture(send={"max_attempts": 4, "retry_delay_seconds": 1, "timeout_seconds": 5})


def test_kill_9_while_receiving_then_the_pacs_resends(node, pacs, t1_dir):
    node.start()
    pacs.start()
    files = sorted(t1_dir.glob("*.dcm"))
    sender = subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", LOCALHOST, str(node.port),
                               *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: len(list(Path(node.config["storage"]["spool_dir"]).rglob("*.dcm"))) >= 5, 60, 0.02,
               "the first instances")
    node.stop(signal.SIGKILL)
    sender.wait(timeout=60)
    node.start()
    storescu(node.port, files)  # the sender retries the whole series, as a PACS does
    # settled: every job ended and no series still receiving, so no further SEG can come
    wait_until(lambda: seg_receptions(pacs) and node_settled(node, 1), 300, 0.5, "the SEG")
    assert any(j.state is JobState.SENT for j in node.jobs())
    pacs.settle()
    check_seg_against_source(assert_exactly_one_seg(pacs, series_uid_of(t1_dir)).path, t1_dir)
    assert len(pacs.receptions()) == 1


def test_kill_9_while_processing(node, pacs, t1_dir):
    node.start()
    pacs.start()
    storescu(node.port, t1_dir)
    wait_until(lambda: any(j.state is JobState.PROCESSING for j in node.jobs()), 60, 0.05, "processing")
    node.stop(signal.SIGKILL)
    assert node.jobs()[0].state is JobState.PROCESSING
    node.start()
    wait_until(lambda: node.jobs()[0].state is JobState.SENT, 300, 1, "the resumed job to be sent")
    assert_exactly_one_seg(pacs, series_uid_of(t1_dir))
    assert len(pacs.receptions()) == 1


def test_kill_9_while_sending_then_the_pacs_comes_back(node, pacs, t1_dir):
    node.start()  # the PACS is down: the SEG waits in `sending`
    storescu(node.port, t1_dir)
    job = wait_until(lambda: [j for j in node.jobs() if j.state is JobState.SENDING and j.attempts >= 1], 300, 0.5,
                     "a failed send attempt")[0]
    assert job.result_path.exists()
    node.stop(signal.SIGKILL)
    pacs.start()
    node.start()
    wait_until(lambda: node.jobs()[0].state is JobState.SENT, 120, 0.5, "the SEG after the restart")
    assert_exactly_one_seg(pacs, series_uid_of(t1_dir))
    assert len(pacs.receptions()) == 1


def test_pacs_never_back_fails_the_job_and_retry_delivers(node, pacs, t1_dir):
    node.start()
    storescu(node.port, t1_dir)
    job = wait_until(lambda: [j for j in node.jobs() if j.state is JobState.FAILED], 300, 0.5, "the failed job")[0]
    assert job.attempts == 4 and "send failed after 4 attempt(s)" in job.reason
    assert "failed: 1" in node.cli("status").stdout
    pacs.start()
    assert node.cli("retry", str(job.id)).returncode == 0
    wait_until(lambda: node.jobs()[0].state is JobState.SENT, 60, 0.5, "the retried send")
    assert_exactly_one_seg(pacs, series_uid_of(t1_dir))
    assert len(pacs.receptions()) == 1


def _copy_with_new_uids(source: Path, target: Path, index: int) -> None:
    target.mkdir(parents=True)
    study, series, frame = (generate_uid(entropy_srcs=[str(index), s]) for s in ("study", "series", "frame"))
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[str(index), str(path.name)]
        )
        ds.save_as(target / path.name)


def test_eight_concurrent_associations_each_get_one_seg(node, pacs, t1_dir, tmp_path):
    node.start()
    pacs.start()
    folders = []
    for index in range(8):
        folder = tmp_path / f"copy{index}"
        _copy_with_new_uids(t1_dir, folder, index)
        folders.append(folder)
    senders = [
        subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", LOCALHOST, str(node.port), "+sd",
                          str(folder)], env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        for folder in folders
    ]
    assert [s.wait(timeout=300) for s in senders] == [0] * 8
    wait_until(lambda: len(node.jobs()) == 8 and all(j.state is JobState.SENT for j in node.jobs()), 900, 2,
               "eight SEGs")
    segs = seg_receptions(pacs)
    assert len(pacs.receptions()) == len(segs) == 8
    assert len({str(ds.SOPInstanceUID) for _, ds in segs}) == 8
    for folder in folders:
        assert_exactly_one_seg(pacs, series_uid_of(folder))
    assert_no_conflicting_duplicates(pacs)


def test_full_disk_answers_out_of_resources_then_the_series_completes(node, pacs, t1_dir):
    node.config["storage"]["min_free_bytes"] = 10**18  # more than any disk: "full"
    node.start()
    pacs.start()
    result = subprocess.run(["storescu", "-v", "-aet", "MODALITY", "-aec", "DICOMNODE", LOCALHOST, str(node.port),
                             str(sorted(t1_dir.glob("*.dcm"))[0])], capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).lower()
    assert "refused: outofresources" in output, output  # dcmtk's name for 0xA700
    assert node.jobs() == []
    node.stop()
    node.config["storage"]["min_free_bytes"] = 10_000_000  # space is back
    node.start()
    storescu(node.port, t1_dir)
    wait_until(lambda: node.jobs() and all(j.state is JobState.SENT for j in node.jobs()), 300, 1, "the SEG")
    check_seg_against_source(assert_exactly_one_seg(pacs, series_uid_of(t1_dir)).path, t1_dir)


# -- malformed input -------------------------------------------------------------------

def _raw(port: int, payload: bytes) -> None:
    with socket.create_connection((LOCALHOST, port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.settimeout(2)
            sock.recv(4096)
        except OSError:
            pass


def _associate_rq(calling: bytes = b"MODALITY") -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing MR Image Storage, to reach the DIMSE layer."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(body)) + body
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    ctx = item(0x20, struct.pack(">Bxxx", 1) + item(0x30, b"1.2.840.10008.5.1.4.1.1.4")
               + item(0x40, b"1.2.840.10008.1.2.1"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + b"DICOMNODE".ljust(16) + calling.ljust(16) + bytes(32) + app + ctx + user
    return struct.pack(">BxI", 0x01, len(body)) + body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(min_size=1, max_size=2048),  # random bytes
    st.binary(max_size=512).map(lambda b: _associate_rq() + b),  # garbage after a valid request
    st.binary(max_size=512).map(lambda b: _associate_rq() + struct.pack(">BxI", 0x04, len(b)) + b),  # bad P-DATA
    st.integers(0, 255).map(lambda t: struct.pack(">BxI", t, 2**31) + b"\x00" * 8),  # absurd lengths
))
def _fuzz_once(port, payload):
    _raw(port, payload)


def test_fuzzing_then_a_normal_series_still_gets_its_seg(node, pacs, t1_dir, tmp_path):
    node.config["node"]["network_timeout_seconds"] = 5
    node.start()
    pacs.start()
    _fuzz_once(node.port)

    # datasets that are malformed inside a valid association
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    rng = random.Random(0)
    good = pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0])
    # garbled connections hold their slots until the network timeout drops them
    assoc = wait_until(lambda: (lambda a: a if a.is_established else None)(
        ae.associate(LOCALHOST, node.port, ae_title="DICOMNODE")), 120, 1, "a free association slot")
    truncated = tmp_path / "truncated.dcm"
    good.save_as(truncated)
    data = truncated.read_bytes()
    for cut in (200, 700, len(data) // 2):
        bad = tmp_path / f"cut{cut}.dcm"
        bad.write_bytes(data[:cut])
        try:
            assoc.send_c_store(bad)
        except Exception:
            pass
    series_uid = str(good.SeriesInstanceUID)
    mismatched = copy.deepcopy(good)
    mismatched.SOPInstanceUID = generate_uid()
    mismatched.SeriesInstanceUID = generate_uid()
    mismatched.Rows = 999  # header and pixels disagree
    status = assoc.send_c_store(mismatched)
    assert status  # answered
    bad_vr = copy.deepcopy(good)
    bad_vr.SOPInstanceUID = generate_uid()
    bad_vr.SeriesInstanceUID = "1.2.3.x" + str(rng.random())
    status = assoc.send_c_store(bad_vr)
    assert status and status.Status == 0xC210
    if assoc.is_established:
        assoc.release()

    assert node.process.poll() is None, "the node must survive"
    storescu(node.port, t1_dir)
    wait_until(lambda: any(j.series.series_instance_uid == series_uid and j.state is JobState.SENT
                           for j in node.jobs()), 300, 1, "the SEG of the normal series")
    assert_exactly_one_seg(pacs, series_uid)
