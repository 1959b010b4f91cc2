"""TotalSegmentator through its Python API: the task's weights, its config.json, the call.

The weights must be on disk before a run (TotalSegmentator would otherwise try to
download them). The call itself runs in a spawned process (``pipeline.runner``) that
sets the two environment variables TotalSegmentator reads (``TOTALSEG_WEIGHTS_PATH``,
``TOTALSEG_HOME_DIR``) and writes its ``config.json`` with usage statistics off first;
neither touches the calling process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import WeightsMissingError
from pipeline.labels import total_class_names
from pipeline.runner import run_model
from pipeline.settings import ModelSettings
from pipeline.volume import LabelMap, Volume

__all__ = ["TotalSegmentator", "expected_weights", "write_totalseg_config", "run_in_child"]


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
        labels = run_model(volume, run_in_child, self.settings, "TotalSegmentator")
        return LabelMap(array=labels, names=total_class_names(self.settings.task), volume=volume)


def run_in_child(settings: dict, source: str, target: str, error: str) -> None:
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
