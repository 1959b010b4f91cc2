"""The pipeline from instance files to result objects:
classify -> series -> volume -> preprocess -> segment -> SEG, RTSTRUCT, overlay, report.

``process_series`` is pure apart from reading the instance files (and handing each
result instance to the caller's ``save``, if given); it returns a ``SegResult`` saying
what happened and why. The sequence class is decided from the
headers before any pixel is read, and the configured policy decides the preprocessing
(or a skip). Errors a job can end with are ``PipelineError``s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Sequence

import pydicom

from pipeline.errors import TooFewSlicesError
from pipeline.input.classify import Classification, classify_series
from pipeline.input.preprocess import PreprocessingMode, preprocess
from pipeline.input.series import MR_IMAGE_CLASSES, assemble_series, read_headers
from pipeline.input.volume import read_volume
from pipeline.model.identity import describe_model
from pipeline.model.segment import Segmenter
from pipeline.model.types import ModelIdentity, RunReport
from pipeline.outputs.common import Algorithm
from pipeline.outputs.encode import ResultObject, SaveInstance, encode_results
from pipeline.outputs.options import OutputRequest
from pipeline.settings import PipelineSettings

__all__ = [
    "Outcome", "SegResult", "SeriesHeaders", "read_series", "preprocessing_for", "process_series", "algorithm_for",
    "image_headers", "read_image_headers", "classify_headers",
]

log = logging.getLogger(__name__)

# At most 46 characters with the class, so that "Replaces earlier: " fits in front (LO, 64).
_DESCRIPTION_ROOM = 46
_DESCRIPTIONS = {
    PreprocessingMode.NONE: "Auto SEG, {kind} model on unprocessed {cls} MR",
    PreprocessingMode.INVERT: "Auto SEG, {kind} model on inverted {cls} MR",
    PreprocessingMode.INVERT_BLACK_BACKGROUND: "Auto SEG, {kind} model on inverted {cls} MR, black bg",
}


class Outcome(str, Enum):
    SEG = "seg"  # result objects were produced (the SEG and whatever else was asked for)
    EMPTY = "empty"  # the model found no structure: no result, by design
    SKIPPED = "skipped"  # the policy says this kind of series is not segmented


@dataclass(frozen=True)
class SegResult:
    outcome: Outcome
    reason: str
    classification: Classification
    preprocessing: PreprocessingMode | None = None
    objects: tuple[ResultObject, ...] = ()
    segments: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)  # read, preprocess, segment, encode
    model_report: RunReport | None = None  # the model process's own account of the segment stage

    @property
    def timing(self) -> dict[str, float]:
        """Where the time went, in parts that add up to the stages' sum: load (the model,
        0 when warm), read (headers and pixels), preprocess (Equation 1), then the segment
        stage split by the model process's report: nnunet_preprocess (nnU-Net's reader and
        preprocessing), forward (the network's sliding window), export (nnU-Net's labels
        back on the case's grid), model_other (the back-end's own steps around nnU-Net:
        TotalSegmentator's reorientation, resampling to the model's spacing and back,
        postprocessing) and handover (the rest: the image's way to the model process and
        the labels' way back, the wait for a busy or starting process); and encode (the
        result objects, saved as made). Load comes first, as the model line always began
        with it."""
        seconds = dict(self.seconds)
        report = self.model_report
        if report is None or "segment" not in seconds:
            return seconds
        left = seconds.pop("segment")

        def take(part: float) -> float:
            nonlocal left
            taken = min(max(part, 0.0), left)
            left -= taken
            return taken

        load = take(report.load_seconds)
        model = {"nnunet_preprocess": take(report.prepare_seconds), "forward": take(report.forward_seconds),
                 "export": take(report.export_seconds), "model_other": take(report.other_seconds)}
        parts = {"load": load, "read": seconds.pop("read", 0.0), "preprocess": seconds.pop("preprocess", 0.0),
                 **model, "handover": left}
        return {**parts, **seconds}

    @property
    def seg(self) -> pydicom.Dataset | None:
        """The first SEG among the objects, if one was asked for and kept (not saved)."""
        return next((o.datasets[0] for o in self.objects if o.kind == "seg" and o.datasets), None)

    @property
    def seg_series_uid(self) -> str | None:
        """The series of the first SEG among the objects, kept or saved."""
        return next((o.series_instance_uid for o in self.objects if o.kind == "seg"), None)


def algorithm_for(
    settings: PipelineSettings, mode: PreprocessingMode, classification: Classification,
    model: ModelIdentity | None = None, *, preset: str | None = None, series_number_offset: int = 0,
    partial: str | None = None,
) -> Algorithm:
    """The algorithm as the SEG records it: the model with its weights' digest (as the
    model process identified it, else from the settings), and the preprocessing
    parameters the mode uses (none for ``none``, no percentile for ``invert``).

    ``preset``: the model preset's name when a node runs several; the series description
    then names it (shortened to fit), and ``series_number_offset`` keeps its objects'
    SeriesNumbers apart from another preset's.

    ``partial``: what the series lacks, for a series processed on purpose although it is
    not whole (``retry --reprocess --allow-partial``): the description starts with
    "PARTIAL", and the reason is part of the content identity, so its objects never share
    UIDs with those of the whole series."""
    model = model or describe_model(settings.model)
    cls = classification.sequence_class.value
    kind = _model_kind(settings)
    if preset is None:
        description = _DESCRIPTIONS[mode].format(cls=cls, kind=kind)
    else:
        tail = f", {kind} model, {'unprocessed' if mode is PreprocessingMode.NONE else 'inverted'} {cls}"
        description = f"Auto SEG {preset[:_DESCRIPTION_ROOM - len('Auto SEG ') - len(tail)]}{tail}"
    if partial is not None:
        description = f"PARTIAL {description}"[:_DESCRIPTION_ROOM]
    options = settings.preprocessing
    clipped = mode is not PreprocessingMode.NONE
    return Algorithm(
        name=model.name,
        version=model.version,
        task=model.task,
        preprocessing=mode.value,
        sequence_class=cls,
        classification=classification.reason,
        series_description=description,
        software_version=f"dicom-node {version('dicom-node')}",
        clip_min=options.clip_min if clipped else None,
        clip_max=options.clip_max if clipped else None,
        background_percentile=(
            options.background_percentile if mode is PreprocessingMode.INVERT_BLACK_BACKGROUND else None
        ),
        series_number_offset=series_number_offset,
        partial=partial,
    )


def _model_kind(settings: PipelineSettings) -> str:
    """What the model was trained on, as the SEG's description says it: TotalSegmentator's
    ``total_mr`` is an MR model; every other model here is taken for a CT model."""
    model = settings.model
    return "MR" if model.kind == "totalsegmentator" and model.task == "total_mr" else "CT"


def image_headers(headers: Sequence[tuple[Path, pydicom.Dataset]]) -> list[pydicom.Dataset]:
    """The headers of the MR image instances (classic and multi-frame)."""
    return [ds for _, ds in headers if ds.get("SOPClassUID") in MR_IMAGE_CLASSES]


def read_image_headers(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    """Headers (no pixels) of the MR image instances among ``paths``."""
    return image_headers(read_headers(paths))


@dataclass(frozen=True)
class SeriesHeaders:
    """A series' headers (no pixels) and the classifier's verdict: read once, then
    shared by routing and by every model that runs on the series."""

    headers: list[tuple[Path, pydicom.Dataset]]
    classification: Classification

    @property
    def images(self) -> list[pydicom.Dataset]:
        return image_headers(self.headers)


def read_series(paths: Sequence[Path], settings: PipelineSettings) -> SeriesHeaders:
    """Read the headers of a series' files and classify it (``settings.class_rules``)."""
    return classify_headers(read_headers(paths), settings)


def classify_headers(headers: list[tuple[Path, pydicom.Dataset]], settings: PipelineSettings) -> SeriesHeaders:
    """A series' headers, already read (by a caller that grouped files by series), classified."""
    rules = [rule.rule() for rule in settings.class_rules]
    classification = classify_series(image_headers(headers), rules)
    log.info("series classified %s (%s)", classification.sequence_class.value, classification.reason)
    return SeriesHeaders(headers, classification)


def preprocessing_for(
    settings: PipelineSettings, classification: Classification,
) -> tuple[PreprocessingMode | None, str]:
    """The policy's preprocessing for the series, or None with the reason it is skipped."""
    mode = settings.policy.mode_for(classification.sequence_class) if classification.anatomical else None
    if mode is None:
        what = classification.sequence_class.value if classification.anatomical else "non-anatomical"
        return None, f"{what} series, not segmented by policy: {classification.reason}"
    return mode, f"preprocessing {mode.value}"


def process_series(
    paths: Sequence[Path],
    settings: PipelineSettings,
    segmenter: Segmenter,
    outputs: Sequence[OutputRequest] = (OutputRequest("seg"),),
    *,
    supersedes: str | None = None,
    on_stage: Callable[[str], None] | None = None,
    series_headers: SeriesHeaders | None = None,
    preset: str | None = None,
    series_number_offset: int = 0,
    partial: str | None = None,
    max_series_voxels: int | None = None,
    save: SaveInstance | None = None,
) -> SegResult:
    """Run the whole pipeline over the instance files of one series, making the result
    objects ``outputs`` names (each once).

    Memory: ``max_series_voxels`` refuses a series with more voxels to decode
    (``SeriesTooLargeError``, from the headers, before any pixel is decoded); ``save``
    takes each result instance as it is made (``encode_results``), so that the objects
    are not all held until the caller saves them.

    ``supersedes``: the SeriesInstanceUID of an earlier SEG of this series already sent
    to the PACS; the new SEG then says it replaces that one (see ``encode_seg``).
    ``on_stage`` is told the name of each stage as it starts (for progress bars).
    ``series_headers``: the series already read by ``read_series`` (else it is read here).
    ``preset``, ``series_number_offset``, ``partial``: see ``algorithm_for``."""
    stage = on_stage or (lambda name: None)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    read = series_headers or read_series(paths, settings)
    headers, classification = read.headers, read.classification
    mode, why = preprocessing_for(settings, classification)
    if mode is None:
        return SegResult(Outcome.SKIPPED, why, classification)

    try:
        series = assemble_series(headers, min_slices=settings.min_slices, four_d=settings.four_d)
    except TooFewSlicesError as exc:
        return SegResult(Outcome.SKIPPED, f"not a volume: {exc}", classification)
    volume = read_volume(series, max_voxels=max_series_voxels)
    seconds["read"] = time.perf_counter() - start

    start = time.perf_counter()
    stage("preprocess")
    options = settings.preprocessing
    # ``none`` is the volume itself (no copy); the others read it through a view
    prepared = volume if mode is PreprocessingMode.NONE else volume.with_array(
        preprocess(
            volume.voxels,
            mode,
            clip_min=options.clip_min,
            clip_max=options.clip_max,
            background_percentile=options.background_percentile,
        )
    )
    seconds["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    stage("segment")
    label_map = segmenter.segment(prepared)
    if label_map.volume is prepared and prepared is not volume:
        # the encoders read the grid and the series, which the acquired volume shares:
        # the preprocessed voxels go before encoding
        label_map = dataclasses.replace(label_map, volume=volume)
    del prepared
    seconds["segment"] = time.perf_counter() - start

    start = time.perf_counter()
    stage("encode")
    algorithm = algorithm_for(settings, mode, classification, label_map.model, preset=preset,
                              series_number_offset=series_number_offset, partial=partial)
    objects = encode_results(label_map, algorithm, outputs, source=volume, supersedes=supersedes, save=save)
    seconds["encode"] = time.perf_counter() - start
    made = f"{classification.sequence_class.value} ({classification.reason}), preprocessing {mode.value}"
    if series.selection:
        made += f"; 4D series: {series.selection}"
    if not objects:
        return SegResult(
            Outcome.EMPTY, f"{segmenter.describe()} found no structure; no result made; {made}",
            classification, mode, seconds=seconds, model_report=label_map.report,
        )
    names = tuple(label_map.names.get(label, str(label)) for label in label_map.present)
    return SegResult(
        Outcome.SEG,
        f"{len(names)} segment(s) from {len(series.slices)} slices; {made}",
        classification,
        mode,
        objects=objects,
        segments=names,
        seconds=seconds,
        model_report=label_map.report,
    )
