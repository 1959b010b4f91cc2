"""The pipeline from instance files to a DICOM SEG: series -> volume -> preprocess -> segment -> SEG.

``process_series`` is pure apart from reading the instance files; it returns a
``SegResult`` saying what happened. Errors a job can end with are ``PipelineError``s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import pydicom

from pipeline.preprocess import PreprocessingMode, preprocess
from pipeline.seg_writer import Algorithm, encode_seg
from pipeline.segment import Segmenter
from pipeline.series import load_series
from pipeline.settings import PipelineSettings
from pipeline.volume import read_volume

__all__ = ["Outcome", "SegResult", "process_series", "algorithm_for"]

log = logging.getLogger(__name__)

_DESCRIPTIONS = {
    PreprocessingMode.NONE: "Auto SEG, CT model on unprocessed MR",
    PreprocessingMode.INVERT: "Auto SEG, CT model on inverted T1",
    PreprocessingMode.INVERT_BLACK_BACKGROUND: "Auto SEG, CT model on inverted T1 (black bg)",
}


class Outcome(str, Enum):
    SEG = "seg"  # a SEG was produced
    EMPTY = "empty"  # the model found no structure: no SEG, by design


@dataclass(frozen=True)
class SegResult:
    outcome: Outcome
    reason: str
    seg: pydicom.Dataset | None = None
    segments: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)


def algorithm_for(settings: PipelineSettings) -> Algorithm:
    model = settings.model
    mode = settings.preprocessing.mode
    return Algorithm(
        name="TotalSegmentator",
        version=version("TotalSegmentator"),
        task=f"{model.task} ({'fast' if model.fast else 'full'})",
        preprocessing=mode.value,
        series_description=_DESCRIPTIONS[mode],
        software_version=f"dicom-node {version('dicom-node')}",
    )


def process_series(paths: Sequence[Path], settings: PipelineSettings, segmenter: Segmenter) -> SegResult:
    """Run the whole pipeline over the instance files of one series."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    series = load_series(paths, min_slices=settings.min_slices)
    volume = read_volume(series)
    seconds["read"] = time.perf_counter() - start

    start = time.perf_counter()
    options = settings.preprocessing
    prepared = volume.with_array(
        preprocess(
            volume.array,
            options.mode,
            clip_min=options.clip_min,
            clip_max=options.clip_max,
            background_percentile=options.background_percentile,
        )
    )
    seconds["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    label_map = segmenter.segment(prepared)
    seconds["segment"] = time.perf_counter() - start

    start = time.perf_counter()
    seg = encode_seg(label_map, algorithm_for(settings))
    seconds["encode"] = time.perf_counter() - start
    if seg is None:
        return SegResult(Outcome.EMPTY, f"{segmenter.describe()} found no structure; no SEG made", seconds=seconds)
    names = tuple(label_map.names.get(label, str(label)) for label in label_map.present)
    return SegResult(
        Outcome.SEG,
        f"{len(names)} segment(s) from {len(series.slices)} slices, preprocessing {options.mode.value}",
        seg=seg,
        segments=names,
        seconds=seconds,
    )
