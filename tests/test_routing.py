"""Routing rules and several model presets on one series, with real peers and real models.

* Two presets named by one rule (the phantom total model and the phantom "kidney"
  nnU-Net model) give two SEGs with their own UIDs at Orthanc, counted by receptions.
* When the kidney preset's weights are missing, the total preset's SEG still goes out,
  and so does the SEG of a third preset, TotalSegmentator's native MR model ``total_mr``
  on the T1 as acquired (policy none); the job records the missing weights.
* A rule naming an unknown preset or destination stops ``serve`` at start, naming the key.
* ``dicom-node rules test`` on every shared series prints the decision that the node
  records when the same series arrives over DICOM.
* The config: ``models`` presets, the earlier ``pipeline.model`` key, and what a plan
  says (unit level, no model).
"""

from __future__ import annotations

import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import yaml

from dicom_node.config import DEFAULT_MODEL, parse_config
from dicom_node.errors import ConfigError
from dicom_node.store.state import JobState
from dicom_node.work.plan import plan_series
from pipeline.labels import total_class_names
from pipeline.process import read_series
from tests.derived import copy_series
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.node import NodeProcess, node_config, node_settled
from tests.support.orthanc import RECEPTION_LOG, Orthanc
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_until

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def kidney_weights(tmp_path_factory, phantom_weights) -> tuple[Path, str]:
    """The phantom "kidney" nnU-Net model (3 labels), in a weights folder of its own."""
    from demo.phantom_model import make_kidney_model

    folder = tmp_path_factory.mktemp("kidney-weights")
    return folder, make_kidney_model(phantom_weights, folder)


def _two_model_config(folder: Path, node_port: int, destination: dict, phantom_weights: Path,
                      kidney: tuple[Path, str], **rule) -> dict:
    config = node_config(folder, destination=("UNUSED", 1), weights_dir=phantom_weights)
    del config["destination"], config["pipeline"]["model"]
    config["node"]["port"] = node_port
    config["destinations"] = [destination]
    config["models"] = [
        {"name": "total", "weights_dir": str(phantom_weights), "home_dir": str(folder / "totalseg")},
        {"name": "kidney", "kind": "nnunet", "nnunet_model": kidney[1], "weights_dir": str(kidney[0])},
    ]
    config["rules"] = [
        {"name": "localizers", "match": {"anatomical": False}, "skip": True, "reason": "not a volume"},
        {"name": "t1-two-models", "match": {"sequence_class": "T1", "modality": "MR"},
         "models": ["total", "kidney"], **rule},
    ]
    return config


@pytest.mark.e2e
@pytest.mark.peers
def test_a_rule_naming_two_models_gives_two_segs_at_the_destination(tmp_path, node_port, phantom_weights,
                                                                     kidney_weights, t1_dir):
    pacs = Orthanc(tmp_path / "pacs", node_port, lua=RECEPTION_LOG).start()
    destination = {"name": "pacs", "ae_title": pacs.ae_title, "host": LOCALHOST, "port": pacs.dicom_port}
    node = NodeProcess(tmp_path / "node", _two_model_config(tmp_path / "node", node_port, destination,
                                                            phantom_weights, kidney_weights)).start()
    try:
        storescu(node_port, t1_dir)
        [job] = wait_until(lambda: node_settled(node, 1) and node.jobs(), 300, 0.5, "the job to end")
        assert job.state is JobState.SENT, job.reason
        wait_until(lambda: len(pacs.receptions()) >= 2, 30, 0.5, "two SEGs at the PACS")
        status = node.cli("status", "--json").stdout
    finally:
        node.stop()
        receptions = pacs.receptions()
        stored = [pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{orthanc_id}/file")))
                  for orthanc_id in pacs.get("/instances")]
        pacs.stop()

    assert [cls for cls, _ in receptions] == [SEG, SEG]  # two, not one and not three
    assert len({uid for _, uid in receptions}) == 2
    assert sorted(str(ds.SOPInstanceUID) for ds in stored) == sorted(uid for _, uid in receptions)
    assert len({str(ds.SeriesInstanceUID) for ds in stored}) == 2  # each model's SEG is its own series
    names = {frozenset(item.SegmentLabel for item in ds.SegmentSequence) for ds in stored}
    kidney_names = {"kidney_right", "kidney_left", "kidney_tumor"}
    assert any(labels <= kidney_names for labels in names) and any(not labels & kidney_names for labels in names)
    assert job.model_outcomes.splitlines()[0].startswith("total: ")
    assert job.model_outcomes.splitlines()[1].startswith("kidney: ")
    assert 'rule 2 "t1-two-models": matches' in job.routing
    assert '"model_outcomes": ["total: ' in status


@pytest.mark.e2e
@pytest.mark.peers
def test_missing_weights_of_one_model_do_not_stop_the_others(tmp_path, node_port, phantom_weights, t1_dir):
    """total (inverted), kidney (no weights) and total_mr (the MR as acquired), one rule."""
    from demo.phantom_model import make_total_mr_weights

    storescp = StoreSCP(tmp_path / "pacs").start()
    destination = {"name": "pacs", "ae_title": storescp.ae_title, "host": LOCALHOST, "port": storescp.port}
    empty = tmp_path / "no-weights"
    empty.mkdir()
    mr_weights = tmp_path / "total-mr-weights"
    make_total_mr_weights(phantom_weights, mr_weights)
    config = _two_model_config(tmp_path / "node", node_port, destination, phantom_weights,
                               (empty, "Dataset502_PhantomKidney/nnUNetTrainer__nnUNetPlans__3d_fullres"))
    config["models"].append({"name": "total_mr", "task": "total_mr", "weights_dir": str(mr_weights),
                             "home_dir": str(tmp_path / "node" / "totalseg"), "policy": {"T1": "none"}})
    config["rules"][1]["models"].append("total_mr")
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        storescu(node_port, t1_dir)
        [job] = wait_until(lambda: node_settled(node, 1) and node.jobs(), 300, 0.5, "the job to end")
    finally:
        node.stop()
    storescp.settle()
    storescp.stop()

    assert job.state is JobState.SENT, job.reason
    # the total model's SEG and the total_mr model's SEG, once each
    segs = [pydicom.dcmread(path, stop_before_pixels=True) for path in storescp.receptions()]
    assert [str(ds.SOPClassUID) for ds in segs] == [SEG, SEG]
    # each names its preset and model, in its own SeriesNumber (10 apart per preset, in the order of models)
    by_description = {str(ds.SeriesDescription): ds for ds in segs}
    assert set(by_description) == {"Auto SEG total, CT model, inverted T1",
                                   "Auto SEG total_mr, MR model, unprocessed T1"}
    source_number = int(pydicom.dcmread(next(t1_dir.glob("*.dcm")), stop_before_pixels=True).SeriesNumber)
    assert by_description["Auto SEG total, CT model, inverted T1"].SeriesNumber == source_number + 1000
    mr_seg = by_description["Auto SEG total_mr, MR model, unprocessed T1"]
    assert mr_seg.SeriesNumber == source_number + 1020
    mr_labels = {item.SegmentLabel for item in mr_seg.SegmentSequence}
    assert mr_labels <= set(total_class_names("total_mr").values())
    for ds in segs:
        assert not {item.SegmentLabel for item in ds.SegmentSequence} & {"kidney_right", "kidney_left", "kidney_tumor"}
    outcomes = dict(line.split(": ", 1) for line in job.model_outcomes.splitlines())
    assert list(outcomes) == ["total", "kidney", "total_mr"]
    assert outcomes["kidney"].startswith("failed: ") and "weights" in outcomes["kidney"]
    assert str(empty) in outcomes["kidney"]  # where they were looked for
    assert "preprocessing none" in outcomes["total_mr"] and "preprocessing invert_black_background" in outcomes["total"]
    assert "kidney: failed: " in job.reason and "total: " in job.reason


@pytest.mark.peers
def test_a_rule_naming_an_unknown_model_or_destination_stops_the_start(tmp_path, phantom_weights):
    config = node_config(tmp_path, destination=("PACS", free_port()), weights_dir=phantom_weights)
    config["rules"] = [
        {"name": "fine", "match": {}, "models": [DEFAULT_MODEL]},
        {"name": "typo", "match": {"modality": "MR"}, "models": ["kidny"], "destinations": ["archiv"]},
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert 'rules[1] (name "typo"): unknown model "kidny"; models are: default' in result.stderr
    assert 'rules[1] (name "typo"): unknown destination "archiv"; destinations are: pacs' in result.stderr


# --- the rule tester and the node decide alike ------------------------------------------

TESTER_RULES = [
    {"name": "not-volumes", "match": {"anatomical": False}, "skip": True, "reason": "not an anatomical volume"},
    {"name": "thick-t1", "match": {"sequence_class": "T1", "slice_thickness": {"min": 2},
                                   "calling_ae_title": "MODALITY", "manufacturer": "siemens"},
     "models": ["total"]},
    {"name": "t2-to-total", "match": {"sequence_class": "T2"}, "models": ["total"]},  # its policy skips T2
]


def _series_folders(mri_dir: Path) -> list[Path]:
    return sorted(folder for folder in mri_dir.iterdir() if folder.is_dir())


def _tester_blocks(output: str) -> dict[str, str]:
    """``rules test`` output over several series: the explanation by SeriesInstanceUID."""
    blocks = re.split(r"^series (\S+) \(\d+ files\)\n", output, flags=re.M)
    return {uid: text.rstrip("\n") for uid, text in zip(blocks[1::2], blocks[2::2])}


def _derived(mri_dir: Path, folder: Path, **changes) -> Path:
    """A copy of the shared T1 series with new UIDs and header fields changed."""
    for path in copy_series(mri_dir / "t1_siemens_3t_fl2d_sag_hfs", folder, seed=folder.name):
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return folder


@pytest.mark.e2e
@pytest.mark.peers
def test_the_rule_tester_prints_the_decision_the_node_takes(tmp_path, node_port, phantom_weights, mri_dir):
    derived = tmp_path / "derived"  # the same T1 series, each rule 2 field changed to not match
    _derived(mri_dir, derived / "ge", Manufacturer="GE MEDICAL SYSTEMS")
    _derived(mri_dir, derived / "thin", SliceThickness="1.5")
    storescp = StoreSCP(tmp_path / "pacs").start()
    config = node_config(tmp_path / "node", destination=(storescp.ae_title, storescp.port),
                         weights_dir=phantom_weights)
    config["node"]["port"] = node_port
    del config["pipeline"]["model"]
    config["models"] = [{"name": "total", "weights_dir": str(phantom_weights),
                         "home_dir": str(tmp_path / "node" / "totalseg")}]
    config["rules"] = TESTER_RULES
    folders = _series_folders(mri_dir) + _series_folders(derived)
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        for folder in folders:
            storescu(node_port, folder)
        wait_until(lambda: node_settled(node, len(folders)), 600, 0.5, "every series to end")
        jobs = node.jobs()
        testers = [node.cli("rules", "test", str(root), "--calling-ae", "MODALITY") for root in (mri_dir, derived)]
    finally:
        node.stop()
        storescp.stop()
    assert all(tester.returncode == 0 for tester in testers), [tester.stderr for tester in testers]
    printed = {**_tester_blocks(testers[0].stdout), **_tester_blocks(testers[1].stdout)}
    assert len(printed) == len(folders) == len(jobs)
    for job in jobs:
        if "gap of 9.60 mm" in (job.reason or ""):
            continue  # the series with a missing slice ends at completion, before any rule is applied
        assert job.routing == printed[job.series.series_instance_uid], job.series.series_instance_uid

    decisions = {job.series.series_instance_uid: job for job in jobs}
    by_folder = {folder.name: decisions[str(pydicom.dcmread(next(folder.glob("*.dcm")),
                                                            stop_before_pixels=True).SeriesInstanceUID)]
                 for folder in folders}
    # every branch is taken: a skip rule, a model run, a policy skip, no rule at all
    assert by_folder["t1_siemens_3t_fl2d_sag_hfs"].state is JobState.SENT
    assert "decision:\n  model total: runs, preprocessing invert_black_background" in \
        by_folder["t1_siemens_3t_fl2d_sag_hfs"].routing
    assert by_folder["hard_localizer_ge_3plane_phantom"].reason.startswith('skipped by rule 1 "not-volumes"')
    assert by_folder["t2_siemens_3t_tse_ax_adi"].state is JobState.SKIPPED
    assert "not segmented by policy" in by_folder["t2_siemens_3t_tse_ax_adi"].reason
    mprage = by_folder["t1_philips_3t_mprage_sag"]  # a Philips: no rule matches
    assert mprage.state is JobState.SKIPPED and mprage.reason.startswith("no routing rule matches")
    assert 'rule 2 "thick-t1": manufacturer' in mprage.reason and "does not match /siemens/i" in mprage.reason
    assert "manufacturer 'GE MEDICAL SYSTEMS' does not match /siemens/i" in by_folder["ge"].reason
    assert "slice_thickness 1.5 mm is below the minimum 2 mm" in by_folder["thin"].reason
    assert by_folder["ge"].state is by_folder["thin"].state is JobState.SKIPPED
    missing = by_folder["hard_missing_slice_t1_fl2d_sag_hfs_derived"]  # known not whole: never routed
    assert missing.state is JobState.FAILED and "the series is not whole: a gap of 9.60 mm" in missing.reason
    assert missing.routing is None


# --- unit level: the config and the plan ---------------------------------------------


def _config(**extra) -> dict:
    return {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": LOCALHOST, "port": 104},
                             {"name": "research", "ae_title": "RES", "host": LOCALHOST, "port": 105,
                              "outputs": ["rtstruct", "report"]}], **extra}


def test_the_earlier_single_model_key_is_one_preset_named_default(tmp_path):
    config = parse_config(_config(pipeline={"model": {"kind": "nnunet", "nnunet_model": "D/T", "weights_dir": "w"}}),
                          tmp_path)
    [preset] = config.models
    assert preset.name == DEFAULT_MODEL and preset.kind == "nnunet" and preset.weights_dir == tmp_path / "w"
    assert config.pipeline_for(DEFAULT_MODEL).model.nnunet_model == "D/T"
    with pytest.raises(ConfigError, match="give models .* or pipeline.model .*, not both"):
        parse_config(_config(pipeline={"model": {}}, models=[{"name": "a"}]), tmp_path)
    with pytest.raises(ConfigError, match="model name a is used twice"):
        parse_config(_config(models=[{"name": "a"}, {"name": "a"}]), tmp_path)


def test_each_preset_takes_its_own_policy_and_names_its_objects(tmp_path, mri_dir):
    config = parse_config(_config(models=[
        {"name": "total"},
        {"name": "total_mr", "task": "total_mr", "policy": {"T1": "none", "T2": "unprocessed"}},
    ]), tmp_path)
    t2 = read_series(sorted((mri_dir / "t2_siemens_3t_tse_ax_adi").glob("*.dcm")), config.pipeline)
    plan = plan_series(config, t2, "MODALITY")
    assert [(m.preset, m.runs) for m in plan.models] == [("total", False), ("total_mr", True)]
    assert plan.result_keys == {"pacs": ("total_mr.seg",), "research": ("total_mr.rtstruct", "total_mr.report")}
    assert "model total: T2 series, not segmented by policy" in plan.explanation
    assert "no rules configured" in plan.explanation

    t1 = read_series(sorted((mri_dir / "t1_siemens_3t_fl2d_sag_hfs").glob("*.dcm")), config.pipeline)
    modes = {m.preset: m.mode.value for m in plan_series(config, t1, "MODALITY").models}
    assert modes == {"total": "invert_black_background", "total_mr": "none"}


def test_a_rule_sends_to_the_destinations_it_names(tmp_path, mri_dir):
    config = parse_config(_config(models=[{"name": "total"}],
                                  rules=[{"name": "r", "match": {"modality": "MR"}, "models": ["total"],
                                          "destinations": ["research"]}]), tmp_path)
    t1 = read_series(sorted((mri_dir / "t1_siemens_3t_fl2d_sag_hfs").glob("*.dcm")), config.pipeline)
    plan = plan_series(config, t1, "MODALITY")
    assert [d.name for d in plan.destinations] == ["research"]
    assert plan.result_keys == {"research": ("rtstruct", "report")}  # one preset: plain keys
    assert plan.explanation.endswith("send to research (RES@127.0.0.1:105): rtstruct, report")


def test_a_celery_task_names_its_preset_and_the_worker_takes_its_own_paths_for_it(tmp_path):
    import nibabel as nib
    import numpy as np

    from dicom_node.config import WorkerSettings
    from dicom_node.remote.client import CeleryModels
    from dicom_node.remote.worker import _WorkerModels
    from pipeline.settings import ModelSettings

    node = ModelSettings(kind="nnunet", nnunet_model="D/T", weights_dir=tmp_path / "node-weights")
    image = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.float32), np.eye(4))
    request = CeleryModels(node, WorkerSettings(backend="celery"), "kidney").request(image)
    assert request["preset"] == "kidney" and "weights_dir" not in request["model"]

    worker = _WorkerModels({"total": ModelSettings(weights_dir=tmp_path / "w-total"),
                            "kidney": ModelSettings(weights_dir=tmp_path / "w-kidney", device="gpu")}, max_bytes=2**20)
    settings = worker.settings_for(request)
    assert (settings.weights_dir, settings.device, settings.nnunet_model) == (tmp_path / "w-kidney", "gpu", "D/T")
    unknown = worker.settings_for({**request, "preset": "elsewhere"})  # a preset this worker lacks: its first
    assert unknown.weights_dir == tmp_path / "w-total"


def test_each_presets_seg_of_a_grown_series_says_what_it_replaces(tmp_path, t1_dir):
    """A series that grows after its SEGs were sent: each preset's new SEG names its own earlier one."""
    from dicom_node.metrics import Metrics
    from dicom_node.store.spool import Spool
    from dicom_node.store.state import OutboxState, SeriesRef, StateStore
    from dicom_node.work.processor import Processor
    from pipeline.outputs.common import REPLACES
    from tests.test_worker import FakeSegmenter

    config = parse_config(_config(models=[{"name": "total"}, {"name": "total_mr", "task": "total_mr",
                                                                  "policy": {"T1": "none"}}]), tmp_path)
    state, spool = StateStore(tmp_path / "state.db"), Spool(tmp_path / "spool")
    segmenters = {"total": FakeSegmenter(90), "total_mr": FakeSegmenter(90)}
    worker = Processor(config, state, spool, segmenters, Metrics(state))
    headers = sorted(((pydicom.dcmread(path, stop_before_pixels=True), path) for path in t1_dir.glob("*.dcm")),
                     key=lambda pair: int(pair[0].InstanceNumber))

    def receive(pairs) -> int:
        for ds, path in pairs:
            target = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                          path.read_bytes())
            series = SeriesRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, "MODALITY", target.parent)
            state.record_instance(series, ds.SOPInstanceUID, ds.SOPClassUID, target)
        return state.complete_series(series.series_instance_uid)

    def process(job_id: int) -> dict[str, pydicom.Dataset]:
        assert worker.process(state.claim_next_processing()) is JobState.SENDING
        segs = {}
        for item in state.outbox(job_id):
            if item.object.endswith(".seg"):
                segs[item.object] = pydicom.dcmread(next(item.path.glob("*.dcm")), stop_before_pixels=True)
        return segs

    first = process(receive(headers[:-1]))  # the last slice is late
    assert set(first) == {"total.seg", "total_mr.seg"}
    for item in state.outbox(first_job := state.jobs()[0].id):
        state.record_send(item.id, ok=True)
    assert state.job(first_job).state is JobState.SENT
    grown = process(receive(headers[-1:]))
    for key, seg in grown.items():
        assert seg.SeriesDescription == REPLACES + first[key].SeriesDescription, key
        assert seg.SeriesInstanceUID != first[key].SeriesInstanceUID
    assert all(item.state is OutboxState.PENDING for item in state.outbox(state.jobs()[-1].id))


def test_readiness_names_the_preset_whose_weights_are_missing(tmp_path, phantom_weights):
    from dicom_node.service import Node

    config = parse_config({**_config(models=[
        {"name": "total", "weights_dir": str(phantom_weights), "home_dir": str(tmp_path / "totalseg")},
        {"name": "kidney", "kind": "nnunet", "nnunet_model": "Dataset502_PhantomKidney/T", "weights_dir": "empty"},
    ]), "node": {"port": free_port()}, "http": {"port": 0},
        "storage": {"spool_dir": "spool", "state_db": "state.db", "min_free_bytes": 0}}, tmp_path)
    node = Node(config)
    try:
        problem = node._weights_problem()
    finally:
        node.state.close()
    assert problem is not None and problem.startswith("model kidney: ") and "model total" not in problem
    assert str(tmp_path / "empty") in problem
