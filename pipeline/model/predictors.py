"""nnU-Net's predictors kept initialised in the model process, with the request's clock.

A predictor is initialised once per (model folder, folds, checkpoint, device, step
size, mirroring) and then predicts image after image, in this process (no
preprocessing or export workers per call). Both back-ends use it: the nnU-Net back-end
for a custom model, TotalSegmentator's for each of its task's networks.

The clock splits each case into nnU-Net's preprocessing (``prepare_seconds``: its
reader and preprocessing, up to the first forward pass), the forward passes (the
sliding window) and the export (from the last forward pass to the written labels).
On CUDA the sliding window runs under ``torch.autocast`` (half precision), as nnU-Net
2.6 does by default; nothing here turns it off. ``compile`` sets nnU-Net's own switch,
``nnUNet_compile``, in this (the model's) process before any predictor is built.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

from pipeline.model.types import RunReport, worker_name

__all__ = ["Predictors"]


def _torch_device(device: str):
    import torch

    return torch.device("cuda" if device in ("gpu", "cuda") else "cpu")


class Predictors:
    """nnU-Net predictors kept initialised, and the clock of the current request."""

    def __init__(self, *, compile: bool = False) -> None:
        os.environ["nnUNet_compile"] = "true" if compile else "false"  # read by nnU-Net when it initialises
        self._cache: dict[tuple, object] = {}
        self.loads = 0
        self.load_seconds = 0.0
        self.forward_seconds = 0.0
        self.prepare_seconds = 0.0
        self.export_seconds = 0.0
        self._window: list[float] = []  # start of the first and end of the last forward pass of a case

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

    @property
    def initialised(self) -> list:
        """The predictors initialised so far (for the tests: their mirroring and step)."""
        return list(self._cache.values())

    def _time_forward(self, predictor) -> None:
        """Count the network's forward passes (nnU-Net's sliding window) into ``forward_seconds``."""
        network_pass = predictor.predict_logits_from_preprocessed_data

        def timed(data):
            start = time.perf_counter()
            try:
                return network_pass(data)
            finally:
                end = time.perf_counter()
                self.forward_seconds += end - start
                self._window = [self._window[0] if self._window else start, end]

        predictor.predict_logits_from_preprocessed_data = timed

    def predict_file(self, predictor, sources: list[str], target: str, **export) -> None:
        """One case: the model's own reader, preprocessing, forward pass and export, in this process."""
        started = time.perf_counter()
        self._window = []
        io_class = predictor.plans_manager.image_reader_writer_class()
        image, properties = io_class.read_images(sources)
        with contextlib.redirect_stdout(io.StringIO()):
            labels = predictor.predict_single_npy_array(image, properties, None, None, False, **export)
        io_class.write_seg(labels, target, properties)
        ended = time.perf_counter()
        first, last = self._window or [ended, ended]
        self.prepare_seconds += first - started
        self.export_seconds += ended - last

    def start_request(self) -> None:
        self.load_seconds = 0.0
        self.forward_seconds = 0.0
        self.prepare_seconds = 0.0
        self.export_seconds = 0.0
        self._started = time.perf_counter()
        self._started_at = time.time()

    def report(self, device: str):
        """The ``RunReport`` of the request since ``start_request``."""
        return RunReport(worker=worker_name(), device=device, loads=self.loads, load_seconds=self.load_seconds,
                         forward_seconds=self.forward_seconds, total_seconds=time.perf_counter() - self._started,
                         prepare_seconds=self.prepare_seconds, export_seconds=self.export_seconds,
                         started_at=self._started_at, ended_at=time.time())
