"""Typed, frozen settings of the pipeline, validated once when the config is loaded.

The service's config (``dicom_node.config``) embeds these sections; the batch command
and tests build them directly. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.preprocess import PreprocessingMode

__all__ = ["ModelSettings", "PreprocessingSettings", "PipelineSettings"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Frozen):
    """Which segmentation model runs, and where its weights live."""

    task: Literal["total"] = "total"
    fast: bool = True
    weights_dir: Path = Path("var/weights")
    home_dir: Path = Path("var/totalsegmentator")
    device: Literal["cpu", "gpu"] = "cpu"


class PreprocessingSettings(_Frozen):
    """Equation 1 of the preprint; see ``pipeline.preprocess``."""

    mode: PreprocessingMode = PreprocessingMode.INVERT_BLACK_BACKGROUND
    clip_min: float = 0.0
    clip_max: float = 3000.0
    background_percentile: float = Field(1.0, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _clip_range(self) -> "PreprocessingSettings":
        if self.clip_min >= self.clip_max:
            raise ValueError("clip_min must be below clip_max")
        return self


class PipelineSettings(_Frozen):
    """Everything the pipeline needs to turn a series into a SEG."""

    model: ModelSettings = ModelSettings()
    preprocessing: PreprocessingSettings = PreprocessingSettings()
    min_slices: int = Field(3, ge=1)
