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
geometry before returning it (``pipeline.outputs.seg``, ``rtstruct_writer``,
``overlay_writer``, ``report_writer``). The report references the job's SEG when one is
made (the first requested, BINARY before LABELMAP), else the source images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pydicom

from pipeline.input.volume import Volume
from pipeline.model.types import LabelMap
from pipeline.outputs.common import Algorithm
from pipeline.outputs.options import OutputRequest, distinct
from pipeline.outputs.overlay import encode_overlay
from pipeline.outputs.report import encode_report
from pipeline.outputs.rtstruct import encode_rtstruct
from pipeline.outputs.seg import encode_seg

__all__ = ["ResultObject", "encode_results"]

@dataclass(frozen=True)
class ResultObject:
    key: str
    kind: str
    series_instance_uid: str
    datasets: tuple[pydicom.Dataset, ...]


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
            objects.append(ResultObject(request.key, request.kind.value, str(datasets[0].SeriesInstanceUID),
                                        tuple(datasets)))
    return tuple(objects)
