"""The nnU-Net v2 back-end: label names from a model's ``dataset.json``, the weights
check, and nnU-Net's predictor kept initialised in the warm runner.

``NnUNet`` describes a custom model folder on the caller's side (its files, its
weights check). ``Predictors`` and ``NnUNetBackend`` live in the model process
(``pipeline.runner``): a predictor is initialised once per (model folder, folds,
checkpoint, device, step size, mirroring) and then predicts image after image, in this
process (no preprocessing or export workers per call). TotalSegmentator's back-end
uses the same ``Predictors`` for its networks.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import nibabel as nib

from pipeline.errors import SegmentationError, WeightsMissingError
from pipeline.labels import read_label_table
from pipeline.settings import ModelSettings

__all__ = ["NnUNet", "nnunet_label_names", "Predictors", "NnUNetBackend", "run_in_child"]


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
                f" installs it into {self.settings.weights_dir} (the config key pipeline.model.weights_dir)."
                " Series received meanwhile are kept; their failed jobs (`dicom-node status --state failed`)"
                " can be retried once the model is in."
            )


def _torch_device(device: str):
    import torch

    return torch.device("cuda" if device in ("gpu", "cuda") else "cpu")


class Predictors:
    """nnU-Net predictors kept initialised, and the clock of the current request."""

    def __init__(self) -> None:
        self._cache: dict[tuple, object] = {}
        self.loads = 0
        self.load_seconds = 0.0
        self.forward_seconds = 0.0

    def get(self, folder: Path, folds, checkpoint: str, device: str, *,
            tile_step_size: float = 0.5, use_mirroring: bool = True):
        """The predictor for a trained model folder, initialised on first use."""
        key = (str(folder), tuple(folds) if folds is not None else None, checkpoint, str(device),
               tile_step_size, use_mirroring)
        predictor = self._cache.get(key)
        if predictor is None:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            start = time.perf_counter()
            torch_device = device if not isinstance(device, str) else _torch_device(device)
            predictor = nnUNetPredictor(
                tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                perform_everything_on_device=torch_device.type != "cpu", device=torch_device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False,
            )
            with contextlib.redirect_stdout(io.StringIO()):
                predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds,
                                                               checkpoint_name=checkpoint)
            self._time_forward(predictor)
            self._cache[key] = predictor
            self.loads += 1
            self.load_seconds += time.perf_counter() - start
        return predictor

    def _time_forward(self, predictor) -> None:
        """Count the network's forward passes (nnU-Net's sliding window) into ``forward_seconds``."""
        network_pass = predictor.predict_logits_from_preprocessed_data

        def timed(data):
            start = time.perf_counter()
            try:
                return network_pass(data)
            finally:
                self.forward_seconds += time.perf_counter() - start

        predictor.predict_logits_from_preprocessed_data = timed

    def predict_file(self, predictor, sources: list[str], target: str, **export) -> None:
        """One case: the model's own reader, preprocessing, forward pass and export, in this process."""
        io_class = predictor.plans_manager.image_reader_writer_class()
        image, properties = io_class.read_images(sources)
        with contextlib.redirect_stdout(io.StringIO()):
            labels = predictor.predict_single_npy_array(image, properties, None, None, False, **export)
        io_class.write_seg(labels, target, properties)

    def start_request(self) -> None:
        self.load_seconds = 0.0
        self.forward_seconds = 0.0
        self._started = time.perf_counter()

    def report(self, device: str):
        """The ``RunReport`` of the request since ``start_request``."""
        from pipeline.runner import RunReport, worker_name

        return RunReport(worker=worker_name(), device=device, loads=self.loads, load_seconds=self.load_seconds,
                         forward_seconds=self.forward_seconds, total_seconds=time.perf_counter() - self._started)


class NnUNetBackend:
    """Runs in the model process: a custom nnU-Net model on NIfTI images."""

    def __init__(self, settings: ModelSettings, predictors: Predictors | None = None) -> None:
        self.settings = settings
        self.model = NnUNet(settings)
        self.predictors = predictors or Predictors()

    def run(self, image: nib.Nifti1Image):
        import tempfile

        from pipeline.model_identity import describe_model
        from pipeline.runner import ModelReply

        self.predictors.start_request()
        self.model.check_weights()
        predictor = self.predictors.get(self.settings.nnunet_folder, self.settings.folds, self.settings.checkpoint,
                                        self.settings.device)
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
    """The cold path (``pipeline.runner.run_model_on_nifti``): one image in a fresh process."""
    try:
        reply = NnUNetBackend(ModelSettings.model_validate(settings)).run(nib.load(source))
        nib.save(reply.labels, target)
    except BaseException as exc:
        Path(error).write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc
