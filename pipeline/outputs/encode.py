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

Memory: given a ``save``, each instance is handed to it as soon as it is made and
dropped, so that one object is in memory at a time (the overlay: one image); only what
the report needs of the SEG (its UIDs and segments, no frames) is kept until then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Sequence

import pydicom

from pipeline.input.volume import Volume
from pipeline.model.types import LabelMap
from pipeline.outputs.common import Algorithm
from pipeline.outputs.options import OutputRequest, distinct
from pipeline.outputs.overlay import iter_overlay
from pipeline.outputs.report import encode_report
from pipeline.outputs.rtstruct import encode_rtstruct
from pipeline.outputs.seg import encode_seg

__all__ = ["ResultObject", "SaveInstance", "encode_results"]

SaveInstance = Callable[[OutputRequest, pydicom.Dataset], None]
"""Takes one instance of the object ``OutputRequest`` asked for, as soon as it is made
(the node writes it into its spool); what it raises ends the encoding."""

# What the report takes from the SEG it references (``encode_report``): no frames.
_SEG_REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SegmentSequence",
                  "ReferencedSeriesSequence")


@dataclass(frozen=True)
class ResultObject:
    """One result object. ``datasets``: its instances, or none when each was handed to a
    ``save`` as it was made; ``instances`` counts them either way."""

    key: str
    kind: str
    series_instance_uid: str
    datasets: tuple[pydicom.Dataset, ...]
    instances: int


def encode_results(
    label_map: LabelMap,
    algorithm: Algorithm,
    requests: Sequence[OutputRequest],
    *,
    source: Volume | None = None,
    supersedes: str | None = None,
    save: SaveInstance | None = None,
) -> tuple[ResultObject, ...]:
    """Every requested object that has content (none when the label map is empty).

    ``source`` is the volume as acquired, for the overlay's grey values (the label map's
    own volume may be the inverted one). ``supersedes`` is the SEG series an earlier job
    of this series sent (see ``encode_seg``). ``save``: each instance goes to it as it
    is made, and the objects returned hold none (see the module's docstring)."""
    objects: list[ResultObject] = []
    seg: pydicom.Dataset | None = None
    for request in distinct(requests):
        if request.kind == "overlay":
            found = _hand_over(request, iter_overlay(label_map, algorithm, source=source), save)
        else:
            made = _encode_one(request, label_map, algorithm, supersedes, seg)
            if made is not None and request.kind == "seg" and seg is None:
                seg = made if save is None else _seg_reference(made)
            found = _hand_over(request, () if made is None else (made,), save)
            del made  # saved: nothing of it stays while the next object is made
        if found is not None:
            objects.append(found)
    return tuple(objects)


def _encode_one(request: OutputRequest, label_map: LabelMap, algorithm: Algorithm, supersedes: str | None,
                seg: pydicom.Dataset | None) -> pydicom.Dataset | None:
    """The one-instance objects: a SEG, the RTSTRUCT, the report (referencing ``seg``)."""
    if request.kind == "seg":
        return encode_seg(label_map, algorithm, request.seg_options, supersedes=supersedes)
    if request.kind == "rtstruct":
        return encode_rtstruct(label_map, algorithm)
    return encode_report(label_map, algorithm, seg)


def _hand_over(request: OutputRequest, datasets: Iterable[pydicom.Dataset],
               save: SaveInstance | None) -> ResultObject | None:
    """The object of ``datasets`` (None when there is none), each instance kept or, with
    ``save``, saved and let go before the next is made."""
    kept: list[pydicom.Dataset] = []
    series_uid, count = "", 0
    for dataset in datasets:
        series_uid = series_uid or str(dataset.SeriesInstanceUID)
        count += 1
        if save is None:
            kept.append(dataset)
        else:
            save(request, dataset)
    if not count:
        return None
    return ResultObject(request.key, request.kind.value, series_uid, tuple(kept), count)


def _seg_reference(seg: pydicom.Dataset) -> pydicom.Dataset:
    """What the report needs of a SEG that is saved before the report is made."""
    reference = pydicom.Dataset()
    for keyword in _SEG_REFERENCE:
        if keyword in seg:
            reference[keyword] = seg[keyword]
    return reference
