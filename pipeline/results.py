"""The result objects one label map becomes: what the destinations asked for, encoded.

A destination names the outputs it receives (``seg``, ``rtstruct``, ``overlay``,
``report``) and, for the SEG, its encoding (BINARY or LABELMAP, empty frames kept or
not). ``OutputRequest`` is one such object; ``encode_results`` makes each requested
object once, however many destinations receive it, and returns them as
``ResultObject``s: a key that names the object within its job (``seg``,
``seg-labelmap``, ``rtstruct``, ``overlay``, ``report``), its series UID and its
datasets (one per instance: the overlay has one per source slice).

Each encoder derives its UIDs from the same content identity (source planes, model,
preprocessing) and its own object type, and checks its object against the source
geometry before returning it (``pipeline.seg_writer``, ``rtstruct_writer``,
``overlay_writer``, ``report_writer``). The report references the job's SEG when one is
made (the first requested, BINARY before LABELMAP), else the source images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import pydicom

from pipeline.overlay_writer import encode_overlay
from pipeline.report_writer import encode_report
from pipeline.rtstruct_writer import encode_rtstruct
from pipeline.seg_writer import Algorithm, SegOptions, encode_seg
from pipeline.volume import LabelMap, Volume

__all__ = ["OUTPUT_KINDS", "OutputRequest", "ResultObject", "distinct", "encode_results"]

OUTPUT_KINDS = ("seg", "rtstruct", "overlay", "report")


@dataclass(frozen=True)
class OutputRequest:
    """One result object: its kind, and for a SEG its encoding."""

    kind: str
    seg_options: SegOptions = SegOptions()

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output {self.kind!r}; one of {', '.join(OUTPUT_KINDS)}")

    @property
    def key(self) -> str:
        """The object's name within its job and in the outbox: ``seg`` is the BINARY SEG
        without empty frames; other SEG encodings say how they differ."""
        if self.kind != "seg":
            return self.kind
        options = self.seg_options
        key = "seg" if options.segmentation_type == "BINARY" else f"seg-{options.segmentation_type.lower()}"
        return key if options.omit_empty_frames else f"{key}-all-frames"


@dataclass(frozen=True)
class ResultObject:
    key: str
    kind: str
    series_instance_uid: str
    datasets: tuple[pydicom.Dataset, ...]


def distinct(requests: Iterable[OutputRequest]) -> list[OutputRequest]:
    """Each requested object once, SEGs first (the report may reference one), BINARY first."""
    unique = {request.key: request for request in requests}
    order = {kind: n for n, kind in enumerate(OUTPUT_KINDS)}
    return sorted(unique.values(), key=lambda r: (order[r.kind], r.seg_options.segmentation_type != "BINARY", r.key))


def encode_results(
    label_map: LabelMap,
    algorithm: Algorithm,
    requests: Sequence[OutputRequest],
    *,
    source: Volume | None = None,
    supersedes: str | None = None,
) -> tuple[ResultObject, ...]:
    """Every requested object that has content (none when the label map is empty).

    ``source`` is the volume as acquired, for the overlay's grey values (the label map's
    own volume may be the inverted one). ``supersedes`` is the SEG series an earlier job
    of this series sent (see ``encode_seg``)."""
    objects: list[ResultObject] = []
    seg: pydicom.Dataset | None = None
    for request in distinct(requests):
        if request.kind == "seg":
            made = encode_seg(label_map, algorithm, request.seg_options, supersedes=supersedes)
            seg = seg if seg is not None else made
            datasets = [] if made is None else [made]
        elif request.kind == "rtstruct":
            made = encode_rtstruct(label_map, algorithm)
            datasets = [] if made is None else [made]
        elif request.kind == "overlay":
            datasets = encode_overlay(label_map, algorithm, source=source) or []
        else:
            made = encode_report(label_map, algorithm, seg)
            datasets = [] if made is None else [made]
        if datasets:
            objects.append(ResultObject(request.key, request.kind, str(datasets[0].SeriesInstanceUID),
                                        tuple(datasets)))
    return tuple(objects)
