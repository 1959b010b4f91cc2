"""Bounded memory: a series with more voxels than ``storage.max_series_voxels`` ends its
job before any pixel is decoded; result objects are saved and let go one at a time;
sends stream each file from disk (DIMSE to a real storescp, STOW-RS to a real Orthanc),
their peak allocation far below the object's size."""

from __future__ import annotations

import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from dicom_node.config import Destination, parse_config
from dicom_node.errors import SendError
from dicom_node.metrics import Metrics
from dicom_node.send import dicomweb
from dicom_node.send.dicomweb import _MultipartBody, stow_files
from dicom_node.send.dimse import send_files
from dicom_node.store.spool import Spool
from dicom_node.store.state import JobState, StateStore
from dicom_node.work.processor import Processor
from pipeline.outputs.options import OutputRequest, SegOptions
from pipeline.process import Outcome, process_series
from pipeline.settings import PipelineSettings
from tests.derived import legacy_converted
from tests.support.orthanc import Orthanc
from tests.support.paths import LOCALHOST, free_port
from tests.test_worker import FakeSegmenter, received_job

MiB = 2**20


class CountingSegmenter(FakeSegmenter):
    """The fake segmenter, counting the volumes it was given (none: nothing was decoded)."""

    def __init__(self, label: int | None) -> None:
        super().__init__(label)
        self.calls = 0

    def segment(self, volume):
        self.calls += 1
        return super().segment(volume)


def _undecodable_copy(files: list[Path], folder: Path) -> None:
    """``files`` with their pixel data cut to half: headers intact, pixels beyond decoding."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(folder / path.name, enforce_file_format=True)


def _voxels(folder: Path) -> int:
    """Rows x Columns x frames over the series' files, as the limit counts them."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
    return sum(int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)


def _processor(tmp_path: Path, folder: Path, max_series_voxels: int, segmenter: FakeSegmenter):
    config = parse_config({"destination": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()},
                           "storage": {"max_series_voxels": max_series_voxels}}, tmp_path)
    state = StateStore(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    job_id = received_job(folder, state, spool)
    return Processor(config, state, spool, segmenter, Metrics(state)), state, spool, job_id


@pytest.fixture(params=["classic", "multi-frame"])
def undecodable(request, tmp_path, t1_dir) -> Path:
    """The T1 series (35 classic images, or one Legacy Converted Enhanced MR object of 35
    frames) with pixel data no decoder can read."""
    source = t1_dir if request.param == "classic" else legacy_converted(t1_dir, tmp_path / "converted").parent
    folder = tmp_path / "undecodable"
    _undecodable_copy(sorted(source.glob("*.dcm")), folder)
    return folder


def test_a_series_over_the_voxel_limit_fails_its_job_before_any_pixel_is_decoded(undecodable, tmp_path):
    voxels = _voxels(undecodable)
    segmenter = CountingSegmenter(90)
    worker, state, spool, job_id = _processor(tmp_path, undecodable, voxels - 1, segmenter)
    assert worker.process(state.claim_next_processing()) is JobState.FAILED
    reason = state.job(job_id).reason
    assert f"{voxels:,} voxels" in reason and f"limit of {voxels - 1:,}" in reason, reason
    assert "max_series_voxels" in reason and "no pixel was decoded" in reason
    assert segmenter.calls == 0 and not any(spool.result_folder(job_id).glob("*/*.dcm"))


def test_the_same_series_within_the_limit_goes_on_to_decoding(undecodable, tmp_path):
    """The limit is what ended the job above: at the limit, decoding is tried (and fails)."""
    worker, state, _, job_id = _processor(tmp_path, undecodable, _voxels(undecodable), CountingSegmenter(90))
    assert worker.process(state.claim_next_processing()) is JobState.FAILED
    assert "cannot decode the pixels of slice 1" in state.job(job_id).reason


def test_a_series_within_the_limit_is_processed_and_its_objects_saved(tmp_path, t1_dir):
    segmenter = CountingSegmenter(90)
    worker, state, spool, job_id = _processor(tmp_path, t1_dir, _voxels(t1_dir), segmenter)
    assert worker.process(state.claim_next_processing()) is JobState.SENDING
    job = state.job(job_id)
    assert segmenter.calls == 1 and "segment(s) from 35 slices" in job.reason
    assert job.result_path.parent == spool.result_folder(job_id, "seg") and job.result_path.exists()
    assert str(pydicom.dcmread(job.result_path, stop_before_pixels=True).SeriesInstanceUID) == job.seg_series_uid


def test_each_result_object_is_saved_and_let_go_before_the_next_is_made(t1_dir):
    """With ``save``, every instance goes to it as soon as it is made; when the next
    arrives, nothing references the ones before, not even a cycle for the collector (the
    report keeps only the SEG's UIDs and segments)."""
    paths = sorted(t1_dir.glob("*.dcm"))
    outputs = [OutputRequest("seg"), OutputRequest("overlay"), OutputRequest("rtstruct"), OutputRequest("report"),
               OutputRequest("seg", SegOptions("LABELMAP"))]
    earlier: list[weakref.ref] = []
    saved: list[tuple[str, str]] = []

    def save(request: OutputRequest, dataset: pydicom.Dataset) -> None:
        assert all(ref() is None for ref in earlier), f"{request.key}: an earlier instance is still referenced"
        earlier.append(weakref.ref(dataset))
        saved.append((request.key, str(dataset.SOPInstanceUID)))

    result = process_series(paths, PipelineSettings(), FakeSegmenter(90), outputs, save=save)
    assert result.outcome is Outcome.SEG, result.reason
    assert [(o.key, o.instances, o.datasets) for o in result.objects] == [
        ("seg", 1, ()), ("seg-labelmap", 1, ()), ("rtstruct", 1, ()), ("overlay", 35, ()), ("report", 1, ())]
    assert [key for key, _ in saved] == ["seg", "seg-labelmap", "rtstruct"] + ["overlay"] * 35 + ["report"]
    kept = process_series(paths, PipelineSettings(), FakeSegmenter(90), outputs)  # the same objects, held
    assert saved == [(o.key, str(ds.SOPInstanceUID)) for o in kept.objects for ds in o.datasets]
    assert result.seg is None and result.seg_series_uid == str(kept.seg.SeriesInstanceUID)


# ------------------------------------------------------------------ sends that stream from disk


@pytest.fixture(scope="module")
def large_object(tmp_path_factory, t1_dir) -> list[Path]:
    """One result-sized object of 48 MiB: a 40 MiB multi-frame file and two of 4 MiB,
    random 16-bit pixels (uncompressed: every byte goes over the wire)."""
    template = pydicom.dcmread(sorted(t1_dir.glob("*.dcm"))[0])
    folder = tmp_path_factory.mktemp("large_object")
    rng = np.random.default_rng(7)
    series = generate_uid()
    paths = []
    for index, frames in enumerate((20, 2, 2)):
        ds = template.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = 1024
        ds.NumberOfFrames = frames
        ds.PixelData = rng.integers(0, 4096, (frames, 1024, 1024), dtype=np.uint16).tobytes()
        path = folder / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _pixels_by_uid(paths) -> dict[str, bytes]:
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in (pydicom.dcmread(p) for p in paths)}


def _peak_allocation(send) -> tuple[object, int]:
    """What ``send()`` returns, and the most memory Python allocated (every thread) meanwhile."""
    tracemalloc.start()
    try:
        outcome = send()
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.peers
def test_a_dimse_send_streams_each_file_and_the_peer_gets_every_byte(storescp, large_object):
    destination = Destination(ae_title=storescp.ae_title, host=LOCALHOST, port=storescp.port)
    outcome, peak = _peak_allocation(lambda: send_files(large_object, destination, calling_ae_title="NODE",
                                                        timeout=60))
    assert outcome.status == 0x0000
    size = sum(p.stat().st_size for p in large_object)
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB allocated to send {size / MiB:.0f} MiB"
    storescp.settle()
    assert _pixels_by_uid(storescp.receptions()) == _pixels_by_uid(large_object)


@pytest.fixture
def dicomweb_orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc", node_port=free_port(), dicomweb=True).start()
    yield server
    server.stop()


@pytest.mark.peers
def test_a_stow_request_streams_its_body_from_the_files(dicomweb_orthanc, large_object):
    destination = Destination(protocol="dicomweb", url=dicomweb_orthanc.dicomweb_url)
    outcome, peak = _peak_allocation(lambda: stow_files(large_object, destination, timeout=120))
    assert outcome.status == 200
    size = sum(p.stat().st_size for p in large_object)
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB allocated to send {size / MiB:.0f} MiB"
    stored = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicomweb_orthanc.get_bytes(f"/instances/{id_}/file")))
              for id_ in dicomweb_orthanc.get("/instances")]
    assert {str(ds.SOPInstanceUID): ds.PixelData for ds in stored} == _pixels_by_uid(large_object)


def test_the_stow_body_has_its_length_known_and_the_multipart_layout(tmp_path):
    """requests sends the body with a Content-Length (not chunked, which some servers
    refuse), read from the files as it goes; the bytes are the multipart/related body."""
    files = []
    for index, data in enumerate((b"first file", b"second\r\n--file")):
        files.append(tmp_path / f"{index}.dcm")
        files[-1].write_bytes(data)
    body = _MultipartBody(files, [p.stat().st_size for p in files], "b0undary")
    prepared = requests.Request("POST", "http://127.0.0.1/studies", data=body).prepare()
    assert "Transfer-Encoding" not in prepared.headers and prepared.body is body
    expected = (b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nfirst file\r\n"
                b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nsecond\r\n--file\r\n--b0undary--\r\n")
    assert b"".join(body) == expected and prepared.headers["Content-Length"] == str(len(expected))


@pytest.mark.peers
def test_a_file_cut_short_during_a_stow_is_a_local_error_that_may_be_retried(dicomweb_orthanc, large_object,
                                                                               tmp_path, monkeypatch):
    copies = []
    for path in large_object[1:]:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    read_headers = dicomweb._read_headers

    def then_cut(paths, peer):  # the sizes are taken, then the last file loses its end
        found = read_headers(paths, peer)
        copies[-1].write_bytes(copies[-1].read_bytes()[:-1000])
        return found

    monkeypatch.setattr(dicomweb, "_read_headers", then_cut)
    destination = Destination(protocol="dicomweb", url=dicomweb_orthanc.dicomweb_url)
    with pytest.raises(SendError) as caught:
        stow_files(copies, destination, timeout=60)
    error = caught.value
    assert (error.kind, error.permanent) == ("local error", False)
    assert f"cannot read {copies[-1]}" in str(error) and "1000 bytes short" in str(error)
