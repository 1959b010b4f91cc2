"""Bringing model weights onto a machine without internet: import, check, list.

``import_weights(source, weights_dir)`` takes a TotalSegmentator weights release
archive (.zip or .tar[.gz]), a folder holding one, or any nnU-Net v2 trained-model
folder (``<Trainer>__<Plans>__<Configuration>`` with ``plans.json``, ``dataset.json``
and ``fold_N/checkpoint_final.pth``, inside a ``DatasetNNN_Name`` folder). Every model
found must be complete, or nothing is installed and the error names what is missing.
Models land in ``weights_dir/DatasetNNN_Name/<trainer folder>/`` (where TotalSegmentator
and nnU-Net look), and each checkpoint's SHA-256 is recorded in
``weights_dir/manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import NodeError

__all__ = ["WeightsError", "InstalledModel", "import_weights", "installed_models", "MANIFEST"]

MANIFEST = "manifest.json"
_DATASET = re.compile(r"^Dataset\d{3}_.+")
_TRAINER = re.compile(r"^[^_].*__.+__.+$")


class WeightsError(NodeError):
    """An archive or folder is not a complete nnU-Net model."""


@dataclass(frozen=True)
class InstalledModel:
    dataset: str
    trainer: str
    folds: tuple[str, ...]
    checksums: dict[str, str]  # relative checkpoint path -> SHA-256 (from the manifest)
    tasks: tuple[str, ...]  # TotalSegmentator tasks this model serves

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.trainer}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_folders(root: Path) -> list[Path]:
    """Trainer folders under ``root``: any folder with a plans.json or a fold_* folder."""
    candidates = {p.parent for p in root.rglob("plans.json")} | {p.parent for p in root.rglob("fold_*") if p.is_dir()}
    return sorted(c for c in candidates if _TRAINER.match(c.name))


def _check_complete(folder: Path) -> list[str]:
    missing = [name for name in ("plans.json", "dataset.json") if not (folder / name).is_file()]
    folds = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    if not folds:
        missing.append("fold_*/checkpoint_final.pth (no fold folder)")
    missing += [f"{fold.name}/checkpoint_final.pth" for fold in folds if not (fold / "checkpoint_final.pth").is_file()]
    return missing


def _unpack(source: Path, into: Path) -> Path:
    if source.is_dir():
        return source
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for member in archive.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise WeightsError(f"{source}: unsafe path in archive: {member}")
            archive.extractall(into)
        return into
    if tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            archive.extractall(into, filter="data")
        return into
    raise WeightsError(f"{source} is neither a folder nor a .zip or .tar archive")


def import_weights(source: Path, weights_dir: Path, dataset: str | None = None) -> list[InstalledModel]:
    """Check and install every model in ``source``; return what was installed."""
    if not source.exists():
        raise WeightsError(f"{source} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        root = _unpack(source, Path(tmp))
        folders = _model_folders(root)
        if not folders:
            raise WeightsError(
                f"{source}: no nnU-Net model found (expected a folder like"
                " <Trainer>__<Plans>__<Configuration> with plans.json, dataset.json and fold_N/checkpoint_final.pth)"
            )
        problems = []
        for folder in folders:
            missing = _check_complete(folder)
            if missing:
                problems.append(f"{folder.relative_to(root) if folder != root else folder.name}: missing {', '.join(missing)}")
        if problems:
            raise WeightsError(f"{source} is not a complete model: " + "; ".join(problems))
        installed = []
        manifest = _read_manifest(weights_dir)
        for folder in folders:
            dataset_name = folder.parent.name if _DATASET.match(folder.parent.name) else dataset
            if not dataset_name:
                raise WeightsError(f"{folder.name}: not inside a DatasetNNN_Name folder; give the dataset name")
            target = weights_dir / dataset_name / folder.name
            staging = weights_dir / dataset_name / f".{folder.name}.importing"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(folder, staging)
            checksums = {
                str(p.relative_to(staging)): _sha256(p) for p in sorted(staging.glob("fold_*/checkpoint_final.pth"))
            }
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            manifest[f"{dataset_name}/{folder.name}"] = {
                "checkpoints": checksums, "source": source.name, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            installed.append(dataset_name + "/" + folder.name)
        _write_manifest(weights_dir, manifest)
    return [m for m in installed_models(weights_dir) if m.name in installed]


def _read_manifest(weights_dir: Path) -> dict:
    path = weights_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_manifest(weights_dir: Path, manifest: dict) -> None:
    weights_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(weights_dir / MANIFEST)


def _tasks_by_folder() -> dict[str, list[str]]:
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    served: dict[str, list[str]] = {}
    for task, config in TASK_CONFIGS.items():
        modes = config.get("sub_modes") or {"default": config}
        for mode, settings in modes.items():
            ids = settings.get("task_id")
            for task_id in ids if isinstance(ids, list) else [ids]:
                info = TASK_ID_WEIGHTS_CONFIGS.get(task_id)
                if info:
                    label = task if mode == "default" else f"{task} ({mode})"
                    served.setdefault(info["foldername"], []).append(label)
    return served


def installed_models(weights_dir: Path) -> list[InstalledModel]:
    manifest = _read_manifest(weights_dir)
    served = _tasks_by_folder()
    models = []
    for folder in _model_folders(weights_dir) if weights_dir.is_dir() else []:
        if folder.name.startswith(".") or folder.parent.parent != weights_dir:
            continue
        name = f"{folder.parent.name}/{folder.name}"
        models.append(InstalledModel(
            dataset=folder.parent.name,
            trainer=folder.name,
            folds=tuple(sorted(p.name for p in folder.glob("fold_*") if (p / "checkpoint_final.pth").is_file())),
            checksums=manifest.get(name, {}).get("checkpoints", {}),
            tasks=tuple(served.get(folder.parent.name, [])),
        ))
    return models
