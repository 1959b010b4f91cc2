"""What each label of a model means: name, SNOMED CT codes, laterality and colour.

TotalSegmentator's class names come from ``totalsegmentator.map_to_binary``; their codes
and colours from the mapping table it ships
(``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``), read here with
the type modifier (laterality) kept. A custom nnU-Net model's come from a table in the
same columns next to the model (``labels.csv``). A name without codes gets a clearly
generic code and a warning, never a crash.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from pipeline.errors import SegmentationError

__all__ = ["Code", "SegmentInfo", "total_class_names", "segment_info", "read_label_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    value: str
    scheme_designator: str
    meaning: str


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    category: Code
    property_type: Code
    type_modifier: Code | None
    rgb: tuple[int, int, int]
    region: Code | None = None  # where a non-anatomical structure (a cyst, a lesion, an implant) lies
    region_modifier: Code | None = None  # the region's laterality


_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
_GENERIC_TYPE = Code("91723000", "SCT", "Anatomical structure")


def total_class_names(task: str = "total") -> dict[int, str]:
    """TotalSegmentator's label id -> class name for ``task``."""
    from totalsegmentator.map_to_binary import class_map

    return {int(k): str(v) for k, v in class_map[task].items()}


_PREFIXES = (
    "SegmentedPropertyCategoryCodeSequence.",
    "SegmentedPropertyTypeCodeSequence.",
    "SegmentedPropertyTypeModifierCodeSequence.",
    "AnatomicRegionSequence.",
    "AnatomicRegionModifierSequence.",
)


def _read_table(handle: Iterable[str]) -> dict[str, SegmentInfo]:
    """Rows of a code table in the columns of TotalSegmentator's mapping CSV."""
    infos: dict[str, SegmentInfo] = {}
    for row in csv.DictReader(handle):

        def code(prefix: str) -> Code | None:
            value = (row.get(prefix + "CodeValue") or "").strip()
            if not value:
                return None
            return Code(value, row[prefix + "CodingSchemeDesignator"].strip(), row[prefix + "CodeMeaning"].strip())

        category, property_type, modifier, region, region_modifier = (code(prefix) for prefix in _PREFIXES)
        rgb = tuple(int(v) for v in row["DicomRGBColor"].split(",")) if row.get("DicomRGBColor") else None
        name = row["Structure"].strip()
        infos[name] = SegmentInfo(
            name=name,
            category=category or _ANATOMICAL_STRUCTURE,
            property_type=property_type or _GENERIC_TYPE,
            type_modifier=modifier,
            rgb=rgb or _fallback_colour(name),  # type: ignore[arg-type]
            region=region,
            region_modifier=region_modifier,
        )
    return infos


@lru_cache(maxsize=1)
def _snomed_table() -> dict[str, SegmentInfo]:
    table = resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    with table.open(encoding="utf-8") as handle:
        return _read_table(handle)


def read_label_table(path: Path) -> dict[str, SegmentInfo]:
    """A custom model's code table (``labels.csv`` next to it), or {} when there is none.

    Same columns as TotalSegmentator's mapping: ``Structure``, the ``CodeValue``,
    ``CodingSchemeDesignator`` and ``CodeMeaning`` of
    ``SegmentedPropertyCategoryCodeSequence.``, ``SegmentedPropertyTypeCodeSequence.``,
    ``SegmentedPropertyTypeModifierCodeSequence.`` (laterality), optionally
    ``AnatomicRegionSequence.`` and ``AnatomicRegionModifierSequence.``, and
    ``DicomRGBColor`` as ``R,G,B``.
    """
    if not path.is_file():
        log.warning("no label table at %s: every structure of the model gets a generic code", path)
        return {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return _read_table(handle)
    except (KeyError, ValueError, csv.Error) as exc:
        raise SegmentationError(f"the label table {path} cannot be read: {type(exc).__name__}: {exc}") from exc


def _fallback_colour(name: str) -> tuple[int, int, int]:
    # A stable colour from the name, so that a structure keeps its colour across runs.
    seed = sum((i + 1) * ord(c) for i, c in enumerate(name))
    return (64 + seed % 192, 64 + (seed // 192) % 192, 64 + (seed // 36864) % 192)


def segment_info(name: str, table: Mapping[str, SegmentInfo] | None = None) -> SegmentInfo:
    """Codes and colour for a structure name from ``table`` (TotalSegmentator's when None);
    generic ones, with a warning, if the name is not in it."""
    info = (_snomed_table() if table is None else table).get(name)
    if info is not None:
        return info
    log.warning("no SNOMED CT code known for structure %r; using a generic code", name)
    return SegmentInfo(name, _ANATOMICAL_STRUCTURE, _GENERIC_TYPE, None, _fallback_colour(name))
