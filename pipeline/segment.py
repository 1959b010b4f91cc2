"""Segmentation: TotalSegmentator's Python API, or any nnU-Net v2 model through nnU-Net's predictor.

This module is the boundary with the models: it checks that the weights are on disk
(TotalSegmentator would otherwise try to download them), converts between our LPS
``Volume`` and the RAS NIfTI image the models take, and runs the model in a fresh
process started with ``spawn``. For TotalSegmentator that process sets the two
environment variables it reads (``TOTALSEG_WEIGHTS_PATH``, ``TOTALSEG_HOME_DIR``) and
writes its ``config.json`` with usage statistics off before the call. The separate
process is deliberate: TotalSegmentator and nnU-Net start worker processes of their
own, and a process forked from the node's many threads (SCP, completion, worker) can
inherit a held lock and hang; a crash or leak of the model also stays out of the node.
``make_segmenter`` picks the implementation from the settings; ``describe_model`` names
the model, with its weights' SHA-256, for the SEG's algorithm identification and UIDs.
Every failure becomes a ``PipelineError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Protocol

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.errors import SegmentationError, WeightsMissingError
from pipeline.labels import read_label_table, total_class_names
from pipeline.settings import ModelSettings
from pipeline.volume import LabelMap, Volume

__all__ = [
    "Segmenter",
    "TotalSegmentator",
    "NnUNet",
    "ModelIdentity",
    "make_segmenter",
    "describe_model",
    "nnunet_label_names",
    "expected_weights",
    "volume_to_nifti",
    "nifti_to_array",
    "write_totalseg_config",
]

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class Segmenter(Protocol):
    """Turns a (preprocessed) volume into a label map on the same grid."""

    def describe(self) -> str: ...

    def segment(self, volume: Volume) -> LabelMap: ...


def _ras_affine(image: sitk.Image) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def volume_to_nifti(volume: Volume) -> nib.Nifti1Image:
    """The volume as a NIfTI image with a RAS affine; voxel (i, j, k) = array[k, j, i]."""
    data = np.ascontiguousarray(sitk.GetArrayFromImage(volume.image).transpose(2, 1, 0))
    return nib.Nifti1Image(data, _ras_affine(volume.image))


def nifti_to_array(label_image: nib.Nifti1Image, volume: Volume) -> np.ndarray:
    """A label NIfTI on the volume's grid back to (slice, row, column) order."""
    if not np.allclose(label_image.affine, _ras_affine(volume.image), atol=1e-3):
        raise SegmentationError("the model returned a label image on another grid than its input")
    data = np.asanyarray(label_image.dataobj)
    return np.ascontiguousarray(np.rint(data).astype(np.uint16).transpose(2, 1, 0))


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


def write_totalseg_config(home_dir: Path) -> None:
    """TotalSegmentator's config.json with usage statistics off (kept off on every call)."""
    home_dir.mkdir(parents=True, exist_ok=True)
    path = home_dir / "config.json"
    config: dict = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            config = json.loads(path.read_text())
    config.update(
        {
            "totalseg_id": config.get("totalseg_id", "totalseg_dicom_node"),
            "send_usage_stats": False,
            "prediction_counter": config.get("prediction_counter", 0),
            "statistics_disclaimer_shown": True,
        }
    )
    path.write_text(json.dumps(config, indent=4))


class TotalSegmentator:
    """TotalSegmentator's ``totalsegmentator()`` API on a ``Volume``."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    def describe(self) -> str:
        speed = "fast" if self.settings.fast else "full"
        return f"TotalSegmentator {self.version()} task {self.settings.task} ({speed})"

    @staticmethod
    def version() -> str:
        return version("TotalSegmentator")

    def check_weights(self) -> None:
        missing = [path for path in expected_weights(self.settings) if not path.is_file()]
        if missing:
            folder = missing[0].parent.parent
            raise WeightsMissingError(
                f"model weights for TotalSegmentator task '{self.settings.task}'"
                f" ({'fast' if self.settings.fast else 'full'}) are missing: expected {missing[0]}."
                f" Provide them by copying the release folder '{folder.parent.name}' (with its"
                f" '{folder.name}' subfolder) into {self.settings.weights_dir} (the config key"
                " pipeline.model.weights_dir); on a machine with internet, TotalSegmentator's"
                " `totalseg_download_weights` fetches it. The series is kept and can be"
                " processed again with `dicom-node retry JOB_ID`."
            )

    def segment(self, volume: Volume) -> LabelMap:
        self.check_weights()
        labels = _run_model(volume, _run_in_child, self.settings, "TotalSegmentator")
        return LabelMap(array=labels, names=total_class_names(self.settings.task), volume=volume)


def _run_model(volume: Volume, child: Callable[[dict, str, str, str], None], settings: ModelSettings,
               what: str) -> np.ndarray:
    """Run ``child`` in a spawned process on the volume as NIfTI; the labels on its grid."""
    with tempfile.TemporaryDirectory(prefix="dicom-node-segment-") as tmp:
        source, target, error = Path(tmp) / "image.nii", Path(tmp) / "labels.nii", Path(tmp) / "error.txt"
        nib.save(volume_to_nifti(volume), source)
        process = multiprocessing.get_context("spawn").Process(
            target=child, args=(settings.model_dump(mode="json"), str(source), str(target), str(error)), name=what
        )
        process.start()
        process.join()
        if process.exitcode != 0 or not target.exists():
            reason = error.read_text().strip() if error.exists() else f"exit code {process.exitcode}"
            raise SegmentationError(f"{what} failed: {reason}")
        return nifti_to_array(nib.load(target), volume)


def _run_in_child(settings: dict, source: str, target: str, error: str) -> None:
    """Runs in a spawned process: TotalSegmentator on one NIfTI file."""
    model = ModelSettings.model_validate(settings)
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(model.weights_dir)
    os.environ["TOTALSEG_HOME_DIR"] = str(model.home_dir)
    write_totalseg_config(model.home_dir)
    try:
        from totalsegmentator.python_api import totalsegmentator

        with contextlib.redirect_stdout(io.StringIO()):
            result = totalsegmentator(
                input=nib.load(source),
                output=None,
                task=model.task,
                fast=model.fast,
                ml=True,
                device=model.device,
                quiet=True,
                skip_saving=True,
                nr_thr_resamp=1,
                nr_thr_saving=1,
            )
        nib.save(nib.Nifti1Image(np.asanyarray(result.dataobj).astype(np.uint16), result.affine), target)
    except BaseException as exc:  # SystemExit too: TotalSegmentator exits on some errors
        Path(error).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc


def nnunet_label_names(folder: Path) -> dict[int, str]:
    """Label id -> name from an nnU-Net model's ``dataset.json`` (background left out)."""
    path = folder / "dataset.json"
    try:
        labels = json.loads(path.read_text())["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise SegmentationError(f"cannot read the labels of the nnU-Net model from {path}: {exc}") from exc
    regions = [name for name, value in labels.items() if not isinstance(value, int)]
    if regions:
        raise SegmentationError(f"region-based nnU-Net labels are not supported ({', '.join(regions)} in {path})")
    return {int(value): str(name) for name, value in labels.items() if int(value) != 0}


class NnUNet:
    """Any nnU-Net v2 trained model folder, run by nnU-Net's own predictor.

    The folder is ``weights_dir/nnunet_model`` (``dataset.json``, ``plans.json``,
    ``fold_N/<checkpoint>``); the structures' codes and colours come from the
    ``labels.csv`` next to it.
    """

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.folder = settings.nnunet_folder

    def describe(self) -> str:
        folds = ",".join(str(f) for f in self.settings.folds)
        return f"nnU-Net model {self.settings.nnunet_model} (folds {folds})"

    def expected_files(self) -> list[Path]:
        return [self.folder / "dataset.json", self.folder / "plans.json"] + [
            self.folder / f"fold_{fold}" / self.settings.checkpoint for fold in self.settings.folds
        ]

    def check_weights(self) -> None:
        missing = [path for path in self.expected_files() if not path.is_file()]
        if missing:
            raise WeightsMissingError(
                f"the nnU-Net model {self.settings.nnunet_model} is incomplete: expected {missing[0]}."
                " Install the trained model folder with `dicom-node weights import` into"
                f" {self.settings.weights_dir} (the config key pipeline.model.weights_dir). The series is"
                " kept and can be processed again with `dicom-node retry JOB_ID`."
            )

    def segment(self, volume: Volume) -> LabelMap:
        self.check_weights()
        names = nnunet_label_names(self.folder)
        labels = _run_model(volume, _run_nnunet_in_child, self.settings, "nnU-Net")
        return LabelMap(array=labels, names=names, volume=volume, codes=read_label_table(self.folder / "labels.csv"))


def _run_nnunet_in_child(settings: dict, source: str, target: str, error: str) -> None:
    """Runs in a spawned process: nnU-Net's predictor on one NIfTI file."""
    model = ModelSettings.model_validate(settings)
    try:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        device = torch.device("cuda" if model.device == "gpu" else "cpu")
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = nnUNetPredictor(
                perform_everything_on_device=model.device == "gpu", device=device, verbose=False,
                verbose_preprocessing=False, allow_tqdm=False,
            )
            predictor.initialize_from_trained_model_folder(
                str(model.nnunet_folder), use_folds=model.folds, checkpoint_name=model.checkpoint
            )
            # the model's own image reader, so the spacing and orientation are read as in training
            io_class = predictor.plans_manager.image_reader_writer_class()
            image, properties = io_class.read_images([source])
            labels = predictor.predict_single_npy_array(image, properties, None, None, False)
            io_class.write_seg(labels, target, properties)
    except BaseException as exc:
        Path(error).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc


def make_segmenter(settings: ModelSettings) -> Segmenter:
    """The segmenter the settings name."""
    return NnUNet(settings) if settings.kind == "nnunet" else TotalSegmentator(settings)


@dataclass(frozen=True)
class ModelIdentity:
    """The model as the SEG's algorithm identification names it."""

    name: str
    version: str
    task: str


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
