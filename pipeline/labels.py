"""What each label of a model means: name, SNOMED CT codes, laterality and colour.

TotalSegmentator's class names come from ``totalsegmentator.map_to_binary``; their codes
and colours from the mapping table it ships
(``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``), read here with
the type modifier (laterality) kept. A name without codes gets a clearly generic code
and a warning, never a crash.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["Code", "SegmentInfo", "total_class_names", "segment_info"]

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


_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
_GENERIC_TYPE = Code("91723000", "SCT", "Anatomical structure")


def total_class_names(task: str = "total") -> dict[int, str]:
    """TotalSegmentator's label id -> class name for ``task``."""
    from totalsegmentator.map_to_binary import class_map

    return {int(k): str(v) for k, v in class_map[task].items()}


@lru_cache(maxsize=1)
def _snomed_table() -> dict[str, SegmentInfo]:
    table = resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    infos: dict[str, SegmentInfo] = {}
    with table.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            prefix_c, prefix_t, prefix_m = (
                "SegmentedPropertyCategoryCodeSequence.",
                "SegmentedPropertyTypeCodeSequence.",
                "SegmentedPropertyTypeModifierCodeSequence.",
            )

            def code(prefix: str) -> Code | None:
                value = row.get(prefix + "CodeValue", "").strip()
                if not value:
                    return None
                return Code(value, row[prefix + "CodingSchemeDesignator"].strip(), row[prefix + "CodeMeaning"].strip())

            rgb = tuple(int(v) for v in row["DicomRGBColor"].split(","))
            infos[row["Structure"]] = SegmentInfo(
                name=row["Structure"],
                category=code(prefix_c) or _ANATOMICAL_STRUCTURE,
                property_type=code(prefix_t) or _GENERIC_TYPE,
                type_modifier=code(prefix_m),
                rgb=rgb,  # type: ignore[arg-type]
            )
    return infos


def _fallback_colour(name: str) -> tuple[int, int, int]:
    # A stable colour from the name, so that a structure keeps its colour across runs.
    seed = sum((i + 1) * ord(c) for i, c in enumerate(name))
    return (64 + seed % 192, 64 + (seed // 192) % 192, 64 + (seed // 36864) % 192)


def segment_info(name: str) -> SegmentInfo:
    """Codes and colour for a structure name; generic ones (with a warning) if unknown."""
    info = _snomed_table().get(name)
    if info is not None:
        return info
    log.warning("no SNOMED CT code known for structure %r; using a generic code", name)
    return SegmentInfo(name, _ANATOMICAL_STRUCTURE, _GENERIC_TYPE, None, _fallback_colour(name))
