"""Segmentation: the model boundary the rest of the node sees.

``Segmenter`` is what the pipeline calls: a preprocessed ``Volume`` in, a ``LabelMap``
on the same grid out. ``ModelSegmenter`` is the one implementation for real models: it
sends the volume as RAS NIfTI (``pipeline.input.nifti``) to a ``ModelService`` and checks the
label image it gets back against the volume's grid. The service is the embedded warm
runner (``pipeline.model.runner.ModelRunner``, the default) or GPU workers over Celery
(``dicom_node.remote.client.CeleryModels``); nothing above this module knows which.

``model_of(settings)`` describes the configured model on this side (its weights check
and name): TotalSegmentator's API (``pipeline.model.totalseg``) or any nnU-Net v2 model
(``pipeline.model.nnunet``). Every failure is a ``PipelineError``.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.input.nifti import nifti_to_array, volume_to_nifti
from pipeline.input.volume import Volume
from pipeline.model.nnunet import NnUNet
from pipeline.model.runner import ModelRunner
from pipeline.model.totalseg import TotalSegmentator
from pipeline.model.types import LabelMap, ModelReply, ModelService
from pipeline.settings import ModelSettings

__all__ = ["Segmenter", "ModelSegmenter", "make_segmenter", "model_of"]


class Segmenter(Protocol):
    """Turns a (preprocessed) volume into a label map on the same grid."""

    def describe(self) -> str: ...

    def segment(self, volume: Volume) -> LabelMap: ...


def model_of(settings: ModelSettings) -> TotalSegmentator | NnUNet:
    """The configured model as this side sees it: its description and weights check."""
    return NnUNet(settings) if settings.kind == "nnunet" else TotalSegmentator(settings)


class ModelSegmenter:
    """A ``Segmenter`` over a ``ModelService``; each label map carries the model process's
    report of its run (``LabelMap.report``), so several threads may segment at once."""

    def __init__(self, settings: ModelSettings, service: ModelService) -> None:
        self.settings = settings
        self.service = service
        self.model = model_of(settings)

    def describe(self) -> str:
        return self.model.describe()

    def segment(self, volume: Volume) -> LabelMap:
        reply: ModelReply = self.service.run(volume_to_nifti(volume))
        return LabelMap(
            array=nifti_to_array(reply.labels, volume), names=reply.names, volume=volume, codes=reply.codes,
            model=reply.model, report=reply.report,
        )

    def close(self) -> None:
        self.service.close()


def make_segmenter(settings: ModelSettings, service: ModelService | None = None) -> ModelSegmenter:
    """The segmenter for the settings, on ``service`` or on a new embedded warm runner."""
    return ModelSegmenter(settings, service or ModelRunner(settings))
