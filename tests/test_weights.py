"""Offline weights: import of archives and folders, completeness checks, listing."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dicom_node.weights import WeightsError, import_weights, installed_models
from tests.support.paths import REPO

DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, path.relative_to(folder.parent))
    return archive


def test_incomplete_archive_fails_naming_what_is_missing(tmp_path):
    model = tmp_path / "src" / DATASET / TRAINER
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    archive = _zip(tmp_path / "src" / DATASET, tmp_path / "incomplete.zip")
    with pytest.raises(WeightsError) as info:
        import_weights(archive, tmp_path / "weights")
    assert "dataset.json" in str(info.value) and "fold_0/checkpoint_final.pth" in str(info.value)
    assert not (tmp_path / "weights" / DATASET).exists(), "nothing is installed from an incomplete archive"


def test_not_a_model_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no nnU-Net model found"):
        import_weights(tmp_path / "empty", tmp_path / "weights")


@pytest.mark.e2e
def test_phantom_archive_installs_with_checksums_and_the_node_processes_with_it(phantom_weights, t1_dir, tmp_path):
    archive = _zip(phantom_weights / DATASET, tmp_path / "phantom.zip")
    weights = tmp_path / "weights"
    models = import_weights(archive, weights)
    assert [m.name for m in models] == [f"{DATASET}/{TRAINER}"]
    assert "total (fast)" in models[0].tasks
    assert set(models[0].checksums) == {"fold_0/checkpoint_final.pth"}
    assert len(models[0].checksums["fold_0/checkpoint_final.pth"]) == 64
    assert installed_models(weights)[0].checksums == models[0].checksums

    config = tmp_path / "config.yaml"
    config.write_text(
        "destination: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        f"pipeline: {{model: {{weights_dir: '{weights}', home_dir: '{tmp_path / 'home'}'}}}}\n"
    )
    listing = subprocess.run([sys.executable, "-m", "dicom_node", "weights", "list", "--config", str(config)],
                             capture_output=True, text=True, cwd=REPO)
    assert models[0].checksums["fold_0/checkpoint_final.pth"] in listing.stdout
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "process", str(t1_dir), "--output", str(out), "--config", str(config)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(out.glob("*.dcm"))) == 1
