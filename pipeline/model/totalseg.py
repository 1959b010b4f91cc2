"""TotalSegmentator through its Python API: the task's weights, its config.json, the call.

The weights must be on disk before a run (TotalSegmentator would otherwise try to
download them). ``TotalSegmentator`` describes the task on the caller's side (its
checkpoints, the weights check, its label names).

``TotalSegBackend`` runs in the warm model process (``pipeline.model.runner``). It sets the
two environment variables TotalSegmentator reads (``TOTALSEG_WEIGHTS_PATH``,
``TOTALSEG_HOME_DIR``) and writes its ``config.json`` with usage statistics off; none
of this touches the node's process. Every request calls TotalSegmentator's own
``totalsegmentator()``, so everything it does around the network for the task comes
from its own code and task tables: reorientation to canonical, resampling to the
model's spacing, cropping, running and combining the part-models of the full task,
postprocessing, and the inverse resampling and reorientation. The one change is the
network call: TotalSegmentator's ``nnUNetv2_predict`` builds a new predictor and starts
preprocessing and export worker processes on every call; the backend replaces it, in
the model process only, by ``_WarmPredict``, which keeps each part-model's predictor
initialised (``pipeline.model.predictors.Predictors``) and predicts in the process. The
replacement checks the signature of the function it replaces, so a TotalSegmentator
release that changes it fails loudly (and the equality test) instead of drifting.
The preset's ``tta: false`` turns nnU-Net's mirroring off and its ``step_size`` replaces
the one TotalSegmentator asks for (0.8 for ``total``); left at their defaults, the
network runs as TotalSegmentator runs it (the equality test).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import SegmentationError, WeightsMissingError
from pipeline.labels import total_class_names
from pipeline.model.identity import describe_model, expected_weights
from pipeline.model.predictors import Predictors
from pipeline.model.types import ModelReply
from pipeline.settings import ModelSettings

__all__ = ["TotalSegmentator", "TotalSegBackend", "write_totalseg_config", "run_in_child"]


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
                f" Import them now: `dicom-node weights import ARCHIVE_OR_FOLDER --config CONFIG` with"
                f" the release archive or folder '{folder.parent.name}' (with its '{folder.name}'"
                f" subfolder); it installs them into {self.settings.weights_dir} (the config key"
                " models[].weights_dir of the preset). On a machine with internet, TotalSegmentator's"
                " `totalseg_download_weights` fetches them. Series received meanwhile are kept; their"
                " failed jobs (`dicom-node status --state failed`) can be retried once the weights are in."
            )

    def names(self) -> dict[int, str]:
        return total_class_names(self.settings.task)


def _call_totalsegmentator(model: ModelSettings, image: nib.Nifti1Image) -> nib.Nifti1Image:
    from totalsegmentator.python_api import totalsegmentator

    with contextlib.redirect_stdout(io.StringIO()):
        result = totalsegmentator(
            input=image,
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
    return nib.Nifti1Image(np.asanyarray(result.dataobj).astype(np.uint16), result.affine)


def _use_totalseg_folders(model: ModelSettings) -> None:
    """In the model process only: TotalSegmentator's folders and its config.json."""
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(model.weights_dir)
    os.environ["TOTALSEG_HOME_DIR"] = str(model.home_dir)
    write_totalseg_config(model.home_dir)


class _WarmPredict:
    """TotalSegmentator's ``nnUNetv2_predict`` on predictors kept initialised."""

    def __init__(self, original, predictors: Predictors, settings: ModelSettings) -> None:
        expected = ["dir_in", "dir_out", "task_id", "model", "folds", "trainer", "tta", "num_threads_preprocessing",
                    "num_threads_nifti_save", "plans", "device", "quiet", "step_size", "save_probabilities_path",
                    "use_cropped_logits_resampling"]
        found = list(inspect.signature(original).parameters)
        if found != expected:
            raise SegmentationError(
                f"TotalSegmentator {version('TotalSegmentator')} changed nnUNetv2_predict"
                f" ({', '.join(found)}); the warm runner supports the signature of TotalSegmentator 2.18"
            )
        self.predictors = predictors
        self.settings = settings

    def __call__(self, dir_in, dir_out, task_id, model="3d_fullres", folds=None, trainer="nnUNetTrainer",
                 tta=False, num_threads_preprocessing=3, num_threads_nifti_save=2, plans="nnUNetPlans",
                 device="cuda", quiet=False, step_size=0.5, save_probabilities_path=None,
                 use_cropped_logits_resampling=False) -> None:
        import torch
        from totalsegmentator.nnunet import get_output_folder, supports_keyword_argument

        if save_probabilities_path is not None:
            raise SegmentationError("the warm runner does not save probabilities")
        # the thread settings of TotalSegmentator's own nnUNetv2_predict
        if device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        else:
            torch.set_num_threads(1)
        device = torch.device(device) if isinstance(device, str) else device
        predictor = self.predictors.get(Path(get_output_folder(task_id, trainer, plans, model)), folds,
                                        "checkpoint_final.pth", device,
                                        tile_step_size=self.settings.step_size or step_size,
                                        use_mirroring=bool(tta) and self.settings.tta)
        export = {}
        if use_cropped_logits_resampling and supports_keyword_argument(
                predictor.predict_single_npy_array, "use_cropped_logits_resampling"):
            export["use_cropped_logits_resampling"] = True
        cases: dict[str, list[str]] = {}
        for path in sorted(Path(dir_in).glob("*_0???.nii.gz")):
            cases.setdefault(path.name[: -len("_0000.nii.gz")], []).append(str(path))
        for case, sources in cases.items():
            target = Path(dir_out) / f"{case}{predictor.dataset_json['file_ending']}"
            self.predictors.predict_file(predictor, sources, str(target), **export)


class TotalSegBackend:
    """Runs in the model process: TotalSegmentator's ``totalsegmentator()`` with warm networks."""

    def __init__(self, settings: ModelSettings, predictors: Predictors | None = None) -> None:
        _use_totalseg_folders(settings)
        from totalsegmentator.config import setup_nnunet

        setup_nnunet()  # nnU-Net reads its folders when it is first imported, just below
        import totalsegmentator.nnunet as totalseg_nnunet

        self.settings = settings
        self.model = TotalSegmentator(settings)
        self.predictors = predictors or Predictors(compile=settings.compile)
        original = getattr(totalseg_nnunet, "nnUNetv2_predict", None)
        if original is None:
            raise SegmentationError(
                f"TotalSegmentator {version('TotalSegmentator')} has no nnUNetv2_predict; the warm runner"
                " supports the layout of TotalSegmentator 2.18"
            )
        if isinstance(original, _WarmPredict):
            original.predictors, original.settings = self.predictors, settings
        else:
            totalseg_nnunet.nnUNetv2_predict = _WarmPredict(original, self.predictors, settings)

    def run(self, image: nib.Nifti1Image):
        self.predictors.start_request()
        self.model.check_weights()
        labels = _call_totalsegmentator(self.settings, image)
        return ModelReply(
            labels=labels,
            names=self.model.names(),
            codes=None,
            model=describe_model(self.settings),
            report=self.predictors.report(self.settings.device),
        )


def run_in_child(settings: dict, source: str, target: str, error: str) -> None:
    """The cold path (``pipeline.model.runner.run_model_on_nifti``): TotalSegmentator's own
    ``totalsegmentator()``, unchanged, on one NIfTI file in a fresh process."""
    model = ModelSettings.model_validate(settings)
    _use_totalseg_folders(model)
    try:
        nib.save(_call_totalsegmentator(model, nib.load(source)), target)
    except BaseException as exc:  # SystemExit too: TotalSegmentator exits on some errors
        Path(error).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc
