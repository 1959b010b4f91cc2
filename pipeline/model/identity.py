"""The model as the SEG names it: name, version (with the checkpoints' SHA-256) and task.

The digests go into the SEG's algorithm identification and its UIDs, so other weights
give other SEGs. A checkpoint's digest is read from the manifest ``dicom-node weights
import`` wrote when it still describes the file, else hashed (cached by size and mtime).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from pipeline.errors import SegmentationError
from pipeline.model.types import ModelIdentity
from pipeline.settings import ModelSettings

__all__ = ["expected_weights", "describe_model"]


def _task_folders(settings: ModelSettings) -> list[Path]:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    config = get_task_config(settings.task, fast=settings.fast, quiet=True)
    task_ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    folders = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = Path(info.get("rel_path") or ".") / info["foldername"]
        trainer = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config.get('model') or '3d_fullres'}"
        folders.append(settings.weights_dir / folder / trainer)
    return folders


def expected_weights(settings: ModelSettings) -> list[Path]:
    """The checkpoint files TotalSegmentator will load for the configured task."""
    return [folder / "fold_0" / "checkpoint_final.pth" for folder in _task_folders(settings)]


@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime: a new file, a new digest
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_MANIFEST = "manifest.json"  # written by ``dicom-node weights import``: {"<dataset>/<trainer>": {"checkpoints": {...}}}


def _manifest_digest(weights_dir: Path, checkpoint: Path) -> str | None:
    """The SHA-256 ``weights import`` recorded for ``checkpoint``, if it still describes the file.

    Trusted only when the manifest is newer than the checkpoint (the import copies the
    checkpoint with its own time, then writes the manifest): a checkpoint replaced by
    hand after the import is hashed again instead."""
    path = weights_dir / _MANIFEST
    try:
        if path.stat().st_mtime_ns <= checkpoint.stat().st_mtime_ns:
            return None
        manifest = json.loads(path.read_text())
        trainer = checkpoint.parent.parent
        entry = manifest[trainer.relative_to(weights_dir).as_posix()]["checkpoints"]
        digest = entry[checkpoint.relative_to(trainer).as_posix()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _checkpoint_digest(weights_dir: Path, checkpoint: Path) -> str:
    """SHA-256 of a checkpoint: from the import manifest, else hashed (cached by size and mtime)."""
    recorded = _manifest_digest(weights_dir, checkpoint)
    if recorded is not None:
        return recorded
    stat = checkpoint.stat()
    return _sha256(checkpoint, stat.st_size, stat.st_mtime_ns)


def _totalsegmentator_weights(settings: ModelSettings) -> str:
    """The checkpoints of the configured task, as one short digest for the SEG's version.

    Missing weights are named, not raised: ``TotalSegmentator.segment`` refuses to run
    without them, so only a stand-in segmenter (tests, demos) gets here without them."""
    checkpoints = expected_weights(settings)
    if not all(path.is_file() for path in checkpoints):
        return "checkpoint not installed"
    try:
        digests = [_checkpoint_digest(settings.weights_dir, path) for path in checkpoints]
    except OSError as exc:
        raise SegmentationError(f"cannot read the TotalSegmentator weights to identify them: {exc}") from exc
    if len(digests) == 1:
        return f"checkpoint {digests[0][:12]}"
    return f"checkpoints {hashlib.sha256('+'.join(digests).encode()).hexdigest()[:12]}"


def describe_model(settings: ModelSettings) -> ModelIdentity:
    """Name, version and task of the configured model. The version includes the
    checkpoints' SHA-256, so other weights give other SEG UIDs."""
    if settings.kind == "totalsegmentator":
        return ModelIdentity(
            "TotalSegmentator",
            f"{version('TotalSegmentator')}; {_totalsegmentator_weights(settings)}",
            f"{settings.task} ({'fast' if settings.fast else 'full'})",
        )
    folder = settings.nnunet_folder
    try:
        name = str(json.loads((folder / "dataset.json").read_text()).get("name") or folder.parent.name)
        digests = [
            _checkpoint_digest(settings.weights_dir, folder / f"fold_{fold}" / settings.checkpoint)[:12]
            for fold in settings.folds
        ]
    except (OSError, ValueError) as exc:
        raise SegmentationError(f"cannot identify the nnU-Net model in {folder}: {exc}") from exc
    folds = ",".join(str(f) for f in settings.folds)
    return ModelIdentity(
        name, f"nnunetv2 {version('nnunetv2')}; checkpoint {'+'.join(digests)}", f"{folder.name} folds {folds}"
    )
