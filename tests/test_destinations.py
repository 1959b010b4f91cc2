"""One series, several destinations, each configured differently, with real peers:

* ``pacs``: Orthanc over DIMSE, SEG and overlay;
* ``research``: dcmtk storescp, RTSTRUCT and report; down at first;
* ``archive``: a second Orthanc with the DICOMweb plugin, STOW-RS with basic auth, SEG;
* ``refusing``: a third Orthanc whose Lua filter fails every instance, STOW-RS, report.

Each receives exactly what it was configured for, counted by receptions (Orthanc's
Lua filter logs each instance it receives, a duplicate too). The destinations that are
up receive while ``research`` is down; it receives once it is back. The refused STOW-RS
is recorded with the instance and its reason, and holds up nobody.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_node.store.state import JobState, OutboxState, StateStore
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.node import NodeProcess, node_config
from tests.support.orthanc import RECEPTION_LOG, Orthanc
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.peers]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

FAILING_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  error("the test's archive is out of order")
end
"""


@pytest.fixture
def peers(tmp_path, node_port):
    pacs = Orthanc(tmp_path / "pacs", node_port, lua=RECEPTION_LOG).start()
    archive = Orthanc(tmp_path / "archive", node_port, dicomweb=True, users={"node": "archive-secret"},
                      lua=RECEPTION_LOG).start()
    refusing = Orthanc(tmp_path / "refusing", node_port, dicomweb=True, lua=FAILING_FILTER).start()
    research = StoreSCP(tmp_path / "research")  # started later: down at first
    yield pacs, archive, refusing, research
    for peer in (pacs, archive, refusing, research):
        peer.stop()


def _outbox(node: NodeProcess) -> dict:
    state = StateStore(Path(node.config["storage"]["state_db"]))
    try:
        return {(item.destination, item.object): item for items in state.outboxes().values() for item in items}
    finally:
        state.close()


def _classes(receptions: list[tuple[str, str]]) -> list[str]:
    return sorted(sop_class for sop_class, _ in receptions)


def test_one_series_to_three_destinations_each_with_its_own_outputs(peers, tmp_path, node_port, phantom_weights,
                                                                     t1_dir):
    pacs, archive, refusing, research = peers
    (tmp_path / "archive.password").write_text("archive-secret\n")
    config = node_config(tmp_path / "node", destination=("UNUSED", 1), weights_dir=phantom_weights,
                         http={"port": free_port()}, send={"max_attempts": 5, "retry_delay_seconds": 1,
                                                            "timeout_seconds": 10})
    del config["destination"]
    config["node"]["port"] = node_port
    config["destinations"] = [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": LOCALHOST, "port": pacs.dicom_port,
         "outputs": ["seg", "overlay"]},
        {"name": "research", "ae_title": research.ae_title, "host": LOCALHOST, "port": research.port,
         "outputs": ["rtstruct", "report"]},
        {"name": "archive", "protocol": "dicomweb", "url": archive.dicomweb_url, "outputs": ["seg"],
         "allow_insecure": True,  # basic auth over http://: the test's Orthanc on 127.0.0.1 speaks plain HTTP
         "auth": {"type": "basic", "username": "node", "password_file": str(tmp_path / "archive.password")}},
        {"name": "refusing", "protocol": "dicomweb", "url": refusing.dicomweb_url, "outputs": ["report"]},
    ]
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        slices = len(list(t1_dir.glob("*.dcm")))
        storescu(node_port, t1_dir)

        # the destinations that are up receive while research is down
        wait_until(lambda: len(pacs.receptions()) >= slices + 1 and archive.receptions(), 300, 0.5,
                   "the SEG and the overlay at pacs, the SEG at the archive")
        down = _outbox(node)[("research", "rtstruct")]
        assert down.state is OutboxState.PENDING and down.attempts >= 1 and "connection refused" in down.last_error
        assert not research.receptions()

        # research comes back and receives what it is configured for
        research.start()
        wait_until(lambda: len(research.receptions()) >= 2, 120, 0.5, "the RTSTRUCT and the report at research")
        job = wait_until(lambda: [j for j in node.jobs() if j.state is JobState.FAILED], 120, 0.5,
                         "the job to end (refusing fails)")[0]
        outbox = _outbox(node)
    finally:
        node.stop()
    research.settle()

    # exactly what each was configured for, once
    assert _classes(pacs.receptions()) == sorted([SEG] + [SECONDARY_CAPTURE] * slices)
    assert len({uid for _, uid in pacs.receptions()}) == slices + 1
    assert _classes(archive.receptions()) == [SEG]
    research_headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in research.receptions()]
    assert sorted(str(ds.SOPClassUID) for ds in research_headers) == sorted([RTSTRUCT, COMPREHENSIVE_3D_SR])
    # the archive's SEG is the pacs' SEG: one object, made once
    assert [uid for cls, uid in pacs.receptions() if cls == SEG] == [uid for _, uid in archive.receptions()]

    # each row's outcome; the refused STOW-RS is recorded with its reason
    states = {key: item.state for key, item in outbox.items()}
    assert states == {("pacs", "seg"): OutboxState.SENT, ("pacs", "overlay"): OutboxState.SENT,
                      ("research", "rtstruct"): OutboxState.SENT, ("research", "report"): OutboxState.SENT,
                      ("archive", "seg"): OutboxState.SENT, ("refusing", "report"): OutboxState.FAILED}
    refused = outbox[("refusing", "report")]
    assert refused.attempts == 5 and refusing.dicomweb_url in refused.last_error
    [report_uid] = [str(ds.SOPInstanceUID) for ds in research_headers if ds.SOPClassUID == COMPREHENSIVE_3D_SR]
    assert report_uid in refused.last_error  # the same report, refused there, named
    assert job.state is JobState.FAILED and "refusing report: send failed after 5 attempt(s)" in job.reason

    # status names every destination's outbox; retry checks the destination's name
    status = node.cli("status").stdout
    assert "destination research (PACS@127.0.0.1" in status and ": 0 pending, 2 sent, 0 failed" in status
    assert "destination refusing (" + refusing.dicomweb_url + "; report): 0 pending, 0 sent, 1 failed" in status
    unknown = node.cli("retry", str(job.id), "--destination", "nowhere")
    assert unknown.returncode != 0 and "no destination 'nowhere'" in unknown.stderr
    again = node.cli("retry", str(job.id), "--destination", "refusing")
    assert again.returncode == 0, again.stderr
    assert _outbox(node)[("refusing", "report")].state is OutboxState.PENDING
    assert _outbox(node)[("pacs", "seg")].state is OutboxState.SENT  # the others are not sent again
