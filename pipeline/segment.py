"""Segmentation: the model boundary the rest of the node sees.

``Segmenter`` is what the worker calls; ``make_segmenter`` picks the implementation the
settings name: TotalSegmentator's Python API (``pipeline.totalseg``) or any nnU-Net v2
model through nnU-Net's predictor (``pipeline.nnunet``). Both check their weights and
run the model in a spawned process (``pipeline.runner``) on the volume as RAS NIfTI
(``pipeline.nifti``); ``pipeline.model_identity`` names the model for the SEG. Every
failure becomes a ``PipelineError``.

The names those modules define are re-exported here, so callers keep one import.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.model_identity import ModelIdentity, describe_model
from pipeline.nifti import nifti_to_array, volume_to_nifti
from pipeline.nnunet import NnUNet, nnunet_label_names
from pipeline.settings import ModelSettings
from pipeline.totalseg import TotalSegmentator, expected_weights, write_totalseg_config
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


class Segmenter(Protocol):
    """Turns a (preprocessed) volume into a label map on the same grid."""

    def describe(self) -> str: ...

    def segment(self, volume: Volume) -> LabelMap: ...


def make_segmenter(settings: ModelSettings) -> Segmenter:
    """The segmenter the settings name."""
    return NnUNet(settings) if settings.kind == "nnunet" else TotalSegmentator(settings)
