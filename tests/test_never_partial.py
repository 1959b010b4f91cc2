"""Never a partial result: bad instances refused at the door, a series known not whole
never processed as if it were, and a disk that fills half-way through a series.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from dicom_node.config import parse_config
from dicom_node.receive.completion import Completion, incompleteness
from dicom_node.store.state import JobState, SeriesRef, StateStore
from pipeline.errors import SeriesError
from pipeline.input.series import assemble_series, read_headers
from tests.derived import copy_series
from tests.support.asserts import assert_exactly_one_seg, seg_receptions
from tests.support.dcmtk import StoreSCP
from tests.support.disk import fill_to, small_disk
from tests.support.node import NodeProcess, node_config, status_of
from tests.support.wait import wait_until

MPRAGE = "t1_philips_3t_mprage_sag"


def _send(port: int, items: list) -> list[int]:
    """C-STORE each item (a dataset, or a file sent as its bytes are) over one association."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def _one_byte_short(source: Path, target: Path) -> Path:
    """The file with its PixelData one byte shorter, its length odd, as no encoder would
    write it (pydicom pads an odd value): the bytes are cut by hand."""
    data = bytearray(source.read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    assert at > 0, "explicit VR little endian PixelData expected"
    (length,) = struct.unpack_from("<I", data, at + 8)
    struct.pack_into("<I", data, at + 8, length - 1)
    target.write_bytes(bytes(data[: at + 12 + length - 1]))
    return target


def test_bad_instances_are_refused_at_the_door_with_the_attribute_named(scp, t1_dir, tmp_path):
    server = scp()
    files = sorted(t1_dir.glob("*.dcm"))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(files[0].read_bytes()[:-5000])
    empty = pydicom.dcmread(files[1])
    empty.PixelData = b""
    short = _one_byte_short(files[2], tmp_path / "short.dcm")
    statuses = _send(server.settings.port, [str(truncated), empty, str(short), str(files[3])])
    assert all(status >> 8 in (0xA9, 0xC2) for status in statuses[:3]), [hex(s) for s in statuses]
    assert statuses[3] == 0x0000, "a good instance of the same association is stored"
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    refused = {r.sop_instance_uid: r for r in server.state.refusals(series)}
    uid = {path: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files[:3]}
    assert "PixelData" in refused[uid[files[0]]].reason or "decoded" in refused[uid[files[0]]].reason
    assert refused[uid[files[1]]].reason == "PixelData is empty"
    assert refused[uid[files[2]]].reason.startswith("PixelData has 131071 bytes") and "need 131072" in \
        refused[uid[files[2]]].reason
    stored = [p.name for p in (tmp_path / "spool" / "incoming").rglob("*.dcm")]
    assert stored == [f"{uid}.dcm" for uid in [str(pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)]]
    # the sender stores the instance after all: the refusal is forgotten
    _send(server.settings.port, [str(files[1])])
    assert uid[files[1]] not in {r.sop_instance_uid for r in server.state.refusals(series)}


def test_a_partial_series_gets_uids_of_its_own(t1_dir):
    from pipeline.input.classify import Classification, SequenceClass
    from pipeline.input.preprocess import PreprocessingMode
    from pipeline.model.types import ModelIdentity
    from pipeline.process import algorithm_for
    from pipeline.settings import PipelineSettings

    settings, model = PipelineSettings(), ModelIdentity("TotalSegmentator", "2.18; checkpoint x", "total (fast)")
    verdict = Classification(SequenceClass.T1, True, "TR 300")
    whole = algorithm_for(settings, PreprocessingMode.INVERT_BLACK_BACKGROUND, verdict, model)
    partial = algorithm_for(settings, PreprocessingMode.INVERT_BLACK_BACKGROUND, verdict, model,
                            partial="the node refused 63 of 170 instances")
    assert whole.identity != partial.identity and "partial" not in whole.identity
    assert partial.series_description.startswith("PARTIAL ") and len(partial.series_description) <= 46


def test_two_frames_of_reference_end_the_series_before_any_model_with_the_attribute_named(t1_dir, tmp_path):
    paths = copy_series(t1_dir, tmp_path / "two", seed="two-frames")
    for path in paths[len(paths) // 2:]:
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.543.99"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(SeriesError, match="FrameOfReferenceUID"):
        assemble_series(read_headers(paths))


def _state_with(tmp_path: Path, placements: list[str | None], refused: int = 0) -> tuple[StateStore, SeriesRef]:
    state = StateStore(tmp_path / "state.db")
    ref = SeriesRef("1.2.3", "1.2.3.4", "MODALITY", tmp_path / "series")
    for n, placement in enumerate(placements):
        state.record_instance(ref, f"1.2.3.4.{n}", "1.2.840.10008.5.1.4.1.1.4", tmp_path / f"{n}.dcm", now=100,
                              placement=placement)
    for n in range(refused):
        state.record_refusal(ref, f"1.2.3.4.9{n}", 0xA700, "spool below storage.min_free_bytes", now=100)
    return state, ref


def _completion_settings(tmp_path: Path):
    return parse_config({"destination": {"ae_title": "P", "host": "127.0.0.1", "port": 104},
                         "completion": {"stable_seconds": 5, "incomplete_grace_seconds": 60}}, tmp_path).completion


def test_a_series_with_refused_instances_waits_for_the_sender_then_fails_with_the_count(tmp_path):
    state, ref = _state_with(tmp_path, [None] * 107, refused=63)
    settings = _completion_settings(tmp_path)
    created: list[int] = []
    failed: list[int] = []
    completion = Completion(settings, state, created.append, on_incomplete=failed.append)
    assert incompleteness(state, ref.series_instance_uid) == (
        "the node refused 63 of 170 instances (0xA700: spool below storage.min_free_bytes)")
    assert completion.check(now=106) == [] and not failed, "stable, but not whole: it waits for the sender"
    assert completion.check(now=164) == [] and not failed, "still within the grace"
    completion.check(now=166)
    assert created == [] and len(failed) == 1
    job = state.job(failed[0])
    assert job.state is JobState.FAILED
    assert job.reason.startswith("the series is not whole: the node refused 63 of 170 instances (0xA700")


def test_a_resend_within_the_grace_makes_the_series_whole_again(tmp_path):
    state, ref = _state_with(tmp_path, [None] * 2, refused=1)
    settings = _completion_settings(tmp_path)
    created: list[int] = []
    completion = Completion(settings, state, created.append)
    assert completion.check(now=110) == []
    state.record_instance(ref, "1.2.3.4.90", "1.2.840.10008.5.1.4.1.1.4", tmp_path / "90.dcm", now=120)
    assert incompleteness(state, ref.series_instance_uid) is None
    assert completion.check(now=126) == created and len(created) == 1
    assert state.job(created[0]).state is JobState.RECEIVED


# --- the disk-full case, with a real node, a real spool on a small disk and the 170-slice MPRAGE


def _disk_full_node(tmp_path: Path, pacs: StoreSCP, weights: Path, grace: float) -> tuple[NodeProcess, Path]:
    spool = tmp_path / "small-disk"
    config = node_config(tmp_path / "node", destination=(pacs.ae_title, pacs.port), weights_dir=weights,
                         completion={"incomplete_grace_seconds": grace})
    config["storage"].update({"spool_dir": str(spool), "min_free_bytes": 8_000_000})
    return NodeProcess(tmp_path / "node", config), spool


def _series(mri_dir: Path, tmp_path: Path) -> list[Path]:
    return copy_series(mri_dir / MPRAGE, tmp_path / "series", seed=tmp_path.name)


@pytest.mark.e2e
@pytest.mark.peers
@pytest.mark.parametrize("resend", [False, True], ids=["sender-gives-up", "sender-resends"])
def test_a_spool_that_fills_half_way_never_gives_a_partial_seg(tmp_path, mri_dir, phantom_weights, resend):
    files = _series(mri_dir, tmp_path)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    pacs = StoreSCP(tmp_path / "pacs").start()
    node, spool = _disk_full_node(tmp_path, pacs, phantom_weights, grace=120 if resend else 4)
    with small_disk(spool, 48):
        try:
            node.start()
            per_file = max(p.stat().st_size for p in files)
            filler = fill_to(spool, 8_000_000 + 100 * per_file)  # room for about 100 of the 170
            statuses = _send(node.port, [str(p) for p in files])
            refused = sum(1 for s in statuses if s != 0)
            assert 0 < refused < len(files) and all(s == 0xA700 for s in statuses if s), statuses
            if not resend:
                failed = wait_until(lambda: next((j for j in node.jobs() if j.state is JobState.FAILED), None),
                                    120, 0.5, "the series to end failed")
                assert f"the node refused {refused} of {len(files)} instances (0xA700: spool below" \
                       " storage.min_free_bytes" in failed.reason, failed.reason
                assert "not whole" in node.cli("status").stdout
                assert seg_receptions(pacs) == []
                assert [j.state for j in node.jobs()] == [JobState.FAILED], "nothing else was made"
                # processed on purpose: a SEG that says PARTIAL, of what arrived, under UIDs of its own
                again = node.cli("retry", "--reprocess", "--allow-partial", str(failed.id))
                assert again.returncode == 0, again.stderr
                wait_until(lambda: any(j.state is JobState.SENT for j in node.jobs()), 300, 0.5, "the partial SEG")
                seg = pydicom.dcmread(assert_exactly_one_seg(pacs, series_uid).path)
                assert seg.SeriesDescription.startswith("PARTIAL "), seg.SeriesDescription
                assert "PARTIAL: made on purpose" in seg.ImageComments
                sources = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
                assert len(sources) == len(files) - refused
            else:
                filler.unlink()  # the operator frees space; the PACS resends what was refused
                retried = _send(node.port, [str(p) for p, s in zip(files, statuses) if s != 0])
                assert set(retried) == {0}
                wait_until(lambda: any(j.state is JobState.SENT for j in node.jobs()), 300, 0.5, "the SEG sent")
                seg = pydicom.dcmread(assert_exactly_one_seg(pacs, series_uid).path)
                sources = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0]
                           .ReferencedInstanceSequence}
                assert len(sources) == len(files) == 170
                assert not any(j.state is JobState.FAILED for j in node.jobs())
        finally:
            node.stop()
            pacs.stop()
            shutil.rmtree(spool, ignore_errors=True)


def test_status_names_a_series_waiting_because_instances_were_refused(tmp_path):
    state, ref = _state_with(tmp_path, [None] * 3, refused=2)
    state.close()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "destination": {"ae_title": "P", "host": "127.0.0.1", "port": 104},
        "storage": {"state_db": str(tmp_path / "state.db"), "spool_dir": str(tmp_path / "spool")}}))
    shown = status_of(config)
    assert shown.returncode == 0, shown.stderr
    assert (f"not whole, waiting up to 600 s for the sender: series {ref.series_instance_uid}: the node refused 2"
            " instance(s) (0xA700: spool below storage.min_free_bytes)") in shown.stdout
