"""Typed, frozen settings of the pipeline, validated once when the config is loaded.

The service's config (``dicom_node.config``) embeds these sections; the batch command
and tests build them directly. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.input.classify import ClassRule, SequenceClass
from pipeline.input.preprocess import PreprocessingMode

__all__ = [
    "ModelSettings", "PreprocessingSettings", "Policy", "ModelPreset", "ClassRuleSettings", "PipelineSettings",
]

SKIP = "skip"
UNPROCESSED = "unprocessed"


FourD = Literal["reject", "first", "last"]  # a series with repeated slice positions: refused, or one volume


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Frozen):
    """Which segmentation model runs, and where its weights live.

    ``kind`` is ``totalsegmentator`` (its ``task``: ``total``, the CT model, or
    ``total_mr``, its native MR model; ``fast`` or full; loaded by TotalSegmentator's
    API) or ``nnunet``: any nnU-Net v2 trained model folder ``nnunet_model`` under
    ``weights_dir`` (as ``dicom-node weights import`` installs it), run by nnU-Net's
    predictor, its structures coded by the ``labels.csv`` there.
    """

    kind: Literal["totalsegmentator", "nnunet"] = "totalsegmentator"
    task: Literal["total", "total_mr"] = "total"
    fast: bool = True
    nnunet_model: str | None = None  # e.g. Dataset501_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres
    folds: tuple[int, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    weights_dir: Path = Path("var/weights")
    home_dir: Path = Path("var/totalsegmentator")
    device: Literal["cpu", "gpu"] = "cpu"
    # test-time augmentation (nnU-Net's mirroring): true keeps the model's own choice
    # (nnU-Net models: mirrored; TotalSegmentator: what its API asks, which is none);
    # false turns it off (a nnU-Net model then runs 2 to 8 times fewer forward passes)
    tta: bool = True
    # nnU-Net's sliding-window step, as a fraction of the patch (smaller: more overlap,
    # slower); None keeps the model's own (nnU-Net 0.5; TotalSegmentator 0.8 for total)
    step_size: float | None = Field(None, gt=0.0, le=1.0)
    # torch.compile the network (nnU-Net's nnUNet_compile), in the model process only:
    # a slower first run, faster ones after, on a GPU
    compile: bool = False
    # the deadline of one model run (a fresh model process's start and model load
    # included); past it the process is stopped and the run fails. An hour: the full
    # `total` task (five part-models at 1.5 mm) on a 170-slice series takes tens of
    # minutes on a CPU, and an hour leaves room for a slow or shared one
    timeout_seconds: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _nnunet_needs_a_model(self) -> "ModelSettings":
        if self.kind == "nnunet" and not self.nnunet_model:
            raise ValueError("kind nnunet needs nnunet_model: the trained model folder under weights_dir")
        return self

    @property
    def nnunet_folder(self) -> Path:
        """The nnU-Net trained model folder (kind ``nnunet``)."""
        return self.weights_dir / (self.nnunet_model or "")


class PreprocessingSettings(_Frozen):
    """Parameters of Equation 1 of the preprint; see ``pipeline.input.preprocess``."""

    clip_min: float = 0.0
    clip_max: float = 3000.0
    background_percentile: float = Field(1.0, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _clip_range(self) -> "PreprocessingSettings":
        if self.clip_min >= self.clip_max:
            raise ValueError("clip_min must be below clip_max")
        return self


class Policy(_Frozen):
    """What to do with each sequence class: a preprocessing mode, or skip.

    T1 takes any of the preprint's modes; the preprint shows inversion ruins T2, so T2,
    PD and other take only ``skip`` (no SEG, reason recorded) or ``unprocessed``
    (segment the image as acquired). Series that are not anatomical images are always
    skipped.
    """

    T1: PreprocessingMode | Literal["skip"] = PreprocessingMode.INVERT_BLACK_BACKGROUND
    T2: Literal["skip", "unprocessed"] = "skip"
    PD: Literal["skip", "unprocessed"] = "skip"
    other: Literal["skip", "unprocessed"] = "skip"

    def mode_for(self, sequence_class: SequenceClass) -> PreprocessingMode | None:
        """The preprocessing for a class, or None to skip it."""
        value = getattr(self, sequence_class.value)
        if value == SKIP:
            return None
        if value == UNPROCESSED:
            return PreprocessingMode.NONE
        return PreprocessingMode(value)


class ModelPreset(ModelSettings):
    """A named model (``models`` in the config): the ``ModelSettings`` keys, a ``name``
    that rules refer to, and the ``policy`` it takes per sequence class (left out:
    ``pipeline.policy``). A native MR model such as TotalSegmentator's ``total_mr``
    takes ``policy: {T1: none}``: the T1 image as acquired, never inverted."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    policy: Policy | None = None

    @property
    def settings(self) -> ModelSettings:
        """The model itself, without its name and policy."""
        return ModelSettings.model_validate(self.model_dump(exclude={"name", "policy"}))


class ClassRuleSettings(_Frozen):
    """A site rule: a SeriesDescription regex mapped to a sequence class."""

    series_description: str
    sequence_class: SequenceClass

    def rule(self) -> ClassRule:
        return ClassRule(self.series_description, self.sequence_class)


class PipelineSettings(_Frozen):
    """Everything the pipeline needs to turn a series into a SEG."""

    model: ModelSettings = ModelSettings()
    preprocessing: PreprocessingSettings = PreprocessingSettings()
    policy: Policy = Policy()
    class_rules: tuple[ClassRuleSettings, ...] = ()
    min_slices: int = Field(3, ge=1)
    four_d: FourD = "reject"  # repeated slice positions: reject, or take the first/last volume

    def for_preset(self, preset: ModelPreset) -> "PipelineSettings":
        """These settings with the preset's model, and its policy where it has one."""
        return self.model_copy(update={"model": preset.settings, "policy": preset.policy or self.policy})
