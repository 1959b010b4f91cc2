"""The nnU-Net v2 back-end: label names from a model's ``dataset.json``, the weights
check, and nnU-Net's predictor in a spawned process (``pipeline.runner``)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pipeline.errors import SegmentationError, WeightsMissingError
from pipeline.labels import read_label_table
from pipeline.runner import run_model
from pipeline.settings import ModelSettings
from pipeline.volume import LabelMap, Volume

__all__ = ["NnUNet", "nnunet_label_names", "run_in_child"]


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
        labels = run_model(volume, run_in_child, self.settings, "nnU-Net")
        return LabelMap(array=labels, names=names, volume=volume, codes=read_label_table(self.folder / "labels.csv"))


def run_in_child(settings: dict, source: str, target: str, error: str) -> None:
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
