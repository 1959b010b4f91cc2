"""The nnU-Net v2 back-end: label names from a model's ``dataset.json``, the weights
check, and nnU-Net's predictor kept initialised in the warm runner.

``NnUNet`` describes a custom model folder on the caller's side (its files, its
weights check). ``NnUNetBackend`` lives in the model process (``pipeline.model.runner``)
and predicts with the warm predictors of ``pipeline.model.predictors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib

from pipeline.errors import SegmentationError, WeightsMissingError
from pipeline.labels import read_label_table
from pipeline.model.identity import describe_model
from pipeline.model.predictors import Predictors
from pipeline.model.types import ModelReply
from pipeline.settings import ModelSettings

__all__ = ["NnUNet", "nnunet_label_names", "NnUNetBackend", "run_in_child"]


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
                " Import the trained model folder now: `dicom-node weights import FOLDER --config CONFIG`"
                f" installs it into {self.settings.weights_dir} (the config key models[].weights_dir of the preset)."
                " Series received meanwhile are kept; their failed jobs (`dicom-node status --state failed`)"
                " can be retried once the model is in."
            )


class NnUNetBackend:
    """Runs in the model process: a custom nnU-Net model on NIfTI images."""

    def __init__(self, settings: ModelSettings, predictors: Predictors | None = None) -> None:
        self.settings = settings
        self.model = NnUNet(settings)
        self.predictors = predictors or Predictors(compile=settings.compile)

    def run(self, image: nib.Nifti1Image):
        import tempfile

        self.predictors.start_request()
        self.model.check_weights()
        predictor = self.predictors.get(self.settings.nnunet_folder, self.settings.folds, self.settings.checkpoint,
                                        self.settings.device, tile_step_size=self.settings.step_size or 0.5,
                                        use_mirroring=self.settings.tta)
        with tempfile.TemporaryDirectory(prefix="dicom-node-nnunet-") as tmp:
            source, target = Path(tmp) / "image_0000.nii.gz", Path(tmp) / "labels.nii.gz"
            nib.save(image, source)
            self.predictors.predict_file(predictor, [str(source)], str(target))
            result = nib.load(target)
            labels = nib.Nifti1Image(result.get_fdata(dtype="float32").astype("uint16"), result.affine)
        return ModelReply(
            labels=labels,
            names=nnunet_label_names(self.settings.nnunet_folder),
            codes=read_label_table(self.settings.nnunet_folder / "labels.csv"),
            model=describe_model(self.settings),
            report=self.predictors.report(self.settings.device),
        )


def run_in_child(settings: dict, source: str, target: str, error: str) -> None:
    """The cold path (``pipeline.model.runner.run_model_on_nifti``): one image in a fresh process."""
    try:
        reply = NnUNetBackend(ModelSettings.model_validate(settings)).run(nib.load(source))
        nib.save(reply.labels, target)
    except BaseException as exc:
        Path(error).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc
