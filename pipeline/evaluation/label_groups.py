"""Structure names that TotalSegmentator's ``total`` (CT) and ``total_mr`` (MR) label sets share.

The two tasks name most structures alike, but ``total_mr`` merges some that ``total``
splits: one ``vertebrae`` for ``vertebrae_C1`` .. ``vertebrae_S1``, and one lung per side
for the lobes. Scoring one against the other (``pipeline.evaluation.evaluate``) needs one set of
names, and the rule is:

* ``MERGED`` (below, the one table) maps each name of the coarser set to the names of
  the finer set that it covers. When the compared label sets differ, every name of the
  reference and of each prediction that is a part in ``MERGED`` is renamed to its
  merged name, and the parts' voxels become one structure (their union).
* After that, a structure is *comparable* when every compared label set has it. A
  reference structure that is not comparable (``total`` alone has ``skull``, ribs,
  ``trachea``...; ``total_mr`` alone has ``intervertebral_discs``) is reported as not
  comparable, never scored 0: a model cannot be blamed for a structure it was never
  trained on.
* When all compared label sets are the same (presets of one task), nothing is renamed
  and every structure is scored as before (a structure the prediction lacks scores 0).

The label sets are read from ``totalsegmentator.map_to_binary.class_map``. Only
TotalSegmentator tasks have a known label set; an nnU-Net preset takes no part in
choosing the mapping (its names are used as its ``labels.csv`` gives them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from pipeline.settings import ModelSettings

__all__ = ["MERGED", "NameMapping", "label_set", "mapping_between", "mapping_for"]

#: merged name (``total_mr``) -> the names it covers (``total``)
MERGED: Mapping[str, tuple[str, ...]] = {
    "vertebrae": (
        "vertebrae_C1", "vertebrae_C2", "vertebrae_C3", "vertebrae_C4", "vertebrae_C5", "vertebrae_C6",
        "vertebrae_C7",
        "vertebrae_T1", "vertebrae_T2", "vertebrae_T3", "vertebrae_T4", "vertebrae_T5", "vertebrae_T6",
        "vertebrae_T7", "vertebrae_T8", "vertebrae_T9", "vertebrae_T10", "vertebrae_T11", "vertebrae_T12",
        "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4", "vertebrae_L5",
        "vertebrae_S1",
    ),
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
}


def label_set(task: str) -> frozenset[str]:
    """The structure names of a TotalSegmentator task (``total``, ``total_mr``)."""
    from totalsegmentator.map_to_binary import class_map

    if task not in class_map:
        raise KeyError(f"TotalSegmentator has no task {task!r}")
    return frozenset(class_map[task].values())


@dataclass(frozen=True)
class NameMapping:
    """The names of several label sets brought to one: ``renames`` (part -> merged name)
    and the ``comparable`` names (those every set has after renaming)."""

    tasks: tuple[str, ...]
    renames: Mapping[str, str]
    comparable: frozenset[str]

    def name(self, name: str) -> str:
        """The common name of a structure."""
        return self.renames.get(name, name)

    def is_comparable(self, name: str) -> bool:
        return self.name(name) in self.comparable

    def merge(self, labels: np.ndarray, names: Mapping[int, str]) -> tuple[np.ndarray, dict[int, str]]:
        """A label map with its names renamed, the parts of one merged structure under one
        label (the lowest of theirs). Labels without a name are left as they are."""
        first: dict[str, int] = {}
        for label in sorted(names):
            first.setdefault(self.name(names[label]), label)
        moved = {label: first[self.name(name)] for label, name in names.items() if first[self.name(name)] != label}
        if moved:
            table = np.arange(max(int(labels.max(initial=0)), max(names)) + 1, dtype=labels.dtype)
            for label, target in moved.items():
                table[label] = target
            labels = table[labels]
        return labels, {label: name for name, label in first.items()}


def mapping_between(tasks: Iterable[str]) -> NameMapping | None:
    """The mapping between the label sets of these TotalSegmentator tasks; None when
    they are all the same (nothing to map)."""
    tasks = tuple(dict.fromkeys(tasks))
    if len(tasks) < 2:
        return None
    sets = [label_set(task) for task in tasks]
    renames = {part: merged for merged, parts in MERGED.items() for part in parts}
    common = frozenset.intersection(*(frozenset(renames.get(name, name) for name in names) for names in sets))
    return NameMapping(tasks, renames, common)


def mapping_for(models: Iterable[ModelSettings]) -> NameMapping | None:
    """The mapping for the models compared: between the label sets of their
    TotalSegmentator tasks (None when those are all one task)."""
    return mapping_between(model.task for model in models if model.kind == "totalsegmentator")
