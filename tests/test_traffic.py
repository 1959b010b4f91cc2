"""Real hospital traffic: every way a series arrives. The node runs as a subprocess;
dcmtk's storescu and Orthanc send; dcmtk's storescp receives and keeps every C-STORE
as a file of its own, so "exactly one SEG" is counted by receptions."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.store.state import JobState
from tests.derived import copy_series
from tests.segcheck import check_seg_against_source
from tests.support.asserts import (
    assert_exactly_one_seg,
    assert_no_conflicting_duplicates,
    seg_receptions,
    series_uid_of,
)
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.node import NodeProcess, node_config, node_settled
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.peers]


def _node(tmp_path: Path, pacs: StoreSCP, weights: Path, **overrides) -> NodeProcess:
    return NodeProcess(tmp_path / "node", node_config(
        tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=weights,
        send={"max_attempts": 20, "retry_delay_seconds": 1, "timeout_seconds": 10}, **overrides,
    ))


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []
    yield started
    for node in started:
        if node.process is not None:
            node.stop(signal.SIGKILL)




def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _referenced_instances(seg: pydicom.Dataset) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}


def _storescu_async(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_five_ways_of_sending_a_series_each_give_one_job_and_one_seg(
    tmp_path, pacs, nodes, phantom_weights, t1_dir, orthanc, node_port
):
    # The quiet time must outlast the sender's 5 s pause; a series completes on a release
    # only when it is known whole, which the fl2d T1 (no slice count announced) never is.
    node = _node(tmp_path, pacs, phantom_weights, completion={"stable_seconds": 8})
    node.config["node"]["port"] = node_port
    nodes.append(node.start())
    pacs.start()
    copies = {name: copy_series(t1_dir, tmp_path / name, name)
              for name in ("one_association", "per_instance", "split", "via_orthanc", "interleaved_a", "interleaved_b")}

    storescu(node.port, copies["one_association"])
    for path in copies["per_instance"]:  # a sender that releases after every instance
        storescu(node.port, [path])
    split = copies["split"]
    third = len(split) // 3
    concurrent = [_storescu_async(node.port, split[:third]), _storescu_async(node.port, split[third:2 * third])]
    assert [sender.wait(timeout=120) for sender in concurrent] == [0, 0]
    time.sleep(5)  # the sender pauses (the scenario itself), then sends the rest
    storescu(node.port, split[2 * third:])
    orthanc_series = orthanc.upload(tmp_path / "via_orthanc")
    orthanc.post("/modalities/node/store", {"Resources": orthanc_series, "Synchronous": True})
    a, b = copies["interleaved_a"], copies["interleaved_b"]
    storescu(node.port, [path for pair in zip(a, b) for path in pair])  # one association, two series

    wait_until(lambda: node_settled(node, len(copies)), 900, 1, "every series to end")
    jobs = node.jobs()
    for name, files in copies.items():
        series_uid = series_uid_of(files[0])
        mine = [j for j in jobs if j.series.series_instance_uid == series_uid]
        assert [j.state for j in mine] == [JobState.SENT], f"{name}: {[(j.state, j.reason) for j in mine]}"
        seg = pydicom.dcmread(assert_exactly_one_seg(pacs, series_uid).path)
        assert _referenced_instances(seg) == _sop_uids(files), f"{name}: the SEG must reference every instance"
    assert len(seg_receptions(pacs)) == len(copies)


def test_late_instances_never_leave_a_partial_result_alone(tmp_path, pacs, nodes, phantom_weights, t1_dir):
    node = _node(tmp_path, pacs, phantom_weights, completion={"stable_seconds": 2})
    nodes.append(node.start())
    pacs.start()

    # Sent, then grown: the full series gets a SEG under new UIDs that says it replaces the first.
    files = copy_series(t1_dir, tmp_path / "sent_then_grown", "sent_then_grown")
    series_uid = series_uid_of(files[0])
    storescu(node.port, files[:-3])
    first = wait_until(lambda: seg_receptions(pacs, series_uid), 300, 0.5, "the SEG of the partial series")[0]
    storescu(node.port, files[-3:])
    wait_until(lambda: len(seg_receptions(pacs, series_uid)) >= 2 and node_settled(node, 2), 300, 0.5, "the second SEG")
    partial, full = (pydicom.dcmread(r.path) for r in seg_receptions(pacs, series_uid))
    assert len(seg_receptions(pacs, series_uid)) == 2
    assert _referenced_instances(partial) == _sop_uids(files[:-3])
    assert _referenced_instances(full) == _sop_uids(files)
    assert full.SOPInstanceUID != partial.SOPInstanceUID and full.SeriesInstanceUID != partial.SeriesInstanceUID
    assert full.SeriesDescription.startswith("Replaces earlier") and partial.SeriesDescription != full.SeriesDescription
    check_seg_against_source(seg_receptions(pacs, series_uid)[-1].path, tmp_path / "sent_then_grown")
    assert first.path == seg_receptions(pacs, series_uid)[0].path

    # Not yet sent when the series grew: the SEG of the smaller series never leaves.
    pacs.stop()
    files = copy_series(t1_dir, tmp_path / "grown_before_send", "grown_before_send")
    series_uid = series_uid_of(files[0])
    storescu(node.port, files[:-3])
    wait_until(lambda: [j for j in node.jobs() if j.series.series_instance_uid == series_uid
                        and j.state is JobState.SENDING and j.attempts >= 1], 300, 0.5, "a failed send attempt")
    storescu(node.port, files[-3:])
    wait_until(lambda: [j.state for j in node.jobs() if j.series.series_instance_uid == series_uid]
               == [JobState.SUPERSEDED, JobState.SENDING], 300, 0.5, "the grown series' SEG waiting to be sent")
    pacs.start()
    wait_until(lambda: node_settled(node, 4), 300, 0.5, "the grown series' SEG")
    only = pydicom.dcmread(assert_exactly_one_seg(pacs, series_uid).path)
    assert _referenced_instances(only) == _sop_uids(files)
    assert not only.SeriesDescription.startswith("Replaces earlier")  # nothing was sent before it
    assert_no_conflicting_duplicates(pacs)


def test_sigterm_while_receiving_then_the_whole_series_again(tmp_path, pacs, nodes, phantom_weights, mri_dir):
    node = _node(tmp_path, pacs, phantom_weights, completion={"stable_seconds": 3})
    nodes.append(node.start())
    pacs.start()
    source = mri_dir / "t1_philips_3t_mprage_sag"
    files = copy_series(source, tmp_path / "philips", "philips")
    series_uid = series_uid_of(files[0])
    spool = Path(node.config["storage"]["spool_dir"]) / "incoming"
    sender = _storescu_async(node.port, files)
    wait_until(lambda: len(list(spool.rglob("*.dcm"))) >= 20, 120, 0.02, "part of the series")
    node.stop(signal.SIGTERM)
    sender.wait(timeout=120)
    received_before = len(list(spool.rglob("*.dcm")))
    assert received_before < len(files), "the stop must interrupt the transfer"
    node.start()
    storescu(node.port, files)  # the PACS sends the whole series again
    wait_until(lambda: node_settled(node, 1) and seg_receptions(pacs, series_uid), 600, 1, "the SEG of the whole series")
    segs = [pydicom.dcmread(r.path) for r in seg_receptions(pacs, series_uid)]
    assert _referenced_instances(segs[-1]) == _sop_uids(files)  # the newest covers all 170 slices
    assert len({s.SOPInstanceUID for s in segs}) == len(segs)  # a partial SEG, if any, has UIDs of its own
    for seg in segs[:-1]:
        assert _referenced_instances(seg) < _sop_uids(files)
    assert_no_conflicting_duplicates(pacs)
