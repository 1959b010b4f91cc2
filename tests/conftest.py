from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node.config import parse_config
from dicom_node.metrics import Metrics
from dicom_node.receive.completion import Completion
from dicom_node.receive.scp import StorageSCP
from dicom_node.store.spool import Spool
from dicom_node.store.state import StateStore
from tests.support.dcmtk import StoreSCP
from tests.support.node import NODE_LOGS
from tests.support.orthanc import Orthanc
from tests.support.paths import DATA_ENV, REPO, data_dir, free_port

PHANTOM_MODEL = REPO / "models" / "phantom_total_fast"
CHECKPOINT = (
    "Dataset297_TotalSegmentator_total_3mm_1559subj/"
    "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"
)


_LOGS_BEFORE = pytest.StashKey[int]()


def patient_strings(mri_dir: Path) -> set[str]:
    """The patient names, IDs and birth dates of the shared test data (3+ characters)."""
    import pydicom

    found: set[str] = set()
    for path in mri_dir.glob("*/*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID", "PatientBirthDate"])
        found |= {str(ds.get(k) or "") for k in ("PatientName", "PatientID", "PatientBirthDate")}
    return {value for value in found if len(value) >= 3}


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_call(item):
    """A test that sets the node's logging up in this process (``setup_logging``, a CLI
    command run in-process) leaves the root handlers and the levels as they were: a
    handler on a closed capture stream would fail every later log line. (Innermost, so
    that pytest's own capture handlers of the call are the ones put back.)"""
    root, quiet = logging.getLogger(), ("pynetdicom", "highdicom")
    handlers, level, levels = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in quiet}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in levels.items():
        logging.getLogger(name).setLevel(was)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_LOGS_BEFORE] = len(NODE_LOGS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the tail of every node (and worker) log it started, so that a
    failure seen only in CI says what the node was doing."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for log in NODE_LOGS[item.stash.get(_LOGS_BEFORE, len(NODE_LOGS)):]:
        if log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-80:]
            report.sections.append((f"node log {log.name} ({log.parent.name}), last lines", "\n".join(tail)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Privacy: the log of the whole suite (in-process and every node subprocess) must not
    contain the test data's patient names, IDs or birth dates."""
    if not (data_dir() / "MANIFEST.md").is_file():
        return
    logs = [REPO / ".cache" / "test-suite.log", *NODE_LOGS]
    secrets = patient_strings(data_dir())
    leaks = []
    for log in logs:
        if log.is_file():
            text = log.read_text(errors="replace")
            leaks += [f"{log}: {secret!r}" for secret in secrets if secret in text]
    if leaks:
        print("\nPRIVACY: patient data found in the suite's logs: " + "; ".join(leaks))
        session.exitstatus = 1
    else:
        print(f"\nprivacy check: {len(logs)} log(s) scanned, no patient names, IDs or birth dates")


@pytest.fixture(scope="session")
def mri_dir() -> Path:
    folder = data_dir()
    if not (folder / "MANIFEST.md").is_file():
        pytest.fail(
            f"the shared MRI test series are missing: expected {folder}/MANIFEST.md."
            f" Set {DATA_ENV} to the folder holding them (see README, 'Test data')."
        )
    return folder


@pytest.fixture(scope="session")
def t1_dir(mri_dir: Path) -> Path:
    return mri_dir / "t1_siemens_3t_fl2d_sag_hfs"


@pytest.fixture(scope="session")
def phantom_weights() -> Path:
    """The synthetic phantom model as TotalSegmentator weights (built if not committed)."""
    if (PHANTOM_MODEL / CHECKPOINT).is_file():
        return PHANTOM_MODEL
    cache = REPO / ".cache" / "phantom_total_fast"
    if not (cache / CHECKPOINT).is_file():
        from demo.phantom_model import train_phantom_model

        train_phantom_model(cache)
    return cache


@pytest.fixture
def pacs(tmp_path: Path):
    """A counting storage SCP (dcmtk storescp), not started: a test starts it when the PACS is to be up."""
    server = StoreSCP(tmp_path / "pacs")
    yield server
    server.stop()


@pytest.fixture
def storescp(tmp_path: Path):
    server = StoreSCP(tmp_path / "pacs").start()
    yield server
    server.stop()


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int):
    server = Orthanc(tmp_path / "orthanc", node_port=node_port).start()
    yield server
    server.stop()


@pytest.fixture
def scp(tmp_path):
    started = []

    def start(**overrides):
        data = {
            "node": {"port": free_port()},
            "security": {"allowed_callers": [{"ae_title": "MODALITY", "host": "127.0.0.1"}, {"ae_title": "ECHOSCU"}]},
            "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "storage": {"min_free_bytes": 0},
        }
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        config = parse_config(data, tmp_path)
        state = StateStore(tmp_path / "state.db")
        spool = Spool(tmp_path / "spool")
        server = StorageSCP(config.node, config.security, config.storage, spool, state,
                            Completion(config.completion, state, lambda job: None), Metrics(state))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
