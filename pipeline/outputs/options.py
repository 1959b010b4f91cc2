"""What a destination asks for: the result objects by kind, and the SEG's encoding.

Plain values with no encoder behind them, so the configuration can name them without
loading highdicom (``dicom_node.config`` imports this module, never the writers).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable

# Transfer syntaxes by UID, not from pydicom: the config imports this module and loads no DICOM library.
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_RLE_LOSSLESS = "1.2.840.10008.1.2.5"

__all__ = ["OutputKind", "OUTPUT_KINDS", "SegOptions", "OutputRequest", "distinct"]

class OutputKind(StrEnum):
    """A kind of result object a destination can ask for."""

    SEG = "seg"
    RTSTRUCT = "rtstruct"
    OVERLAY = "overlay"
    REPORT = "report"


OUTPUT_KINDS = tuple(kind.value for kind in OutputKind)


@dataclass(frozen=True)
class SegOptions:
    """How the SEG is encoded, per destination.

    BINARY (the widest viewer support) is written uncompressed: the standard allows
    JPEG 2000 for it, but viewers decode that poorly. LABELMAP (the 2024 Label Map
    Segmentation: one frame per slice, small and fast) is written RLE Lossless.
    """

    segmentation_type: str = "BINARY"
    omit_empty_frames: bool = True

    @property
    def transfer_syntax(self) -> str:
        return _EXPLICIT_VR_LITTLE_ENDIAN if self.segmentation_type == "BINARY" else _RLE_LOSSLESS




@dataclass(frozen=True)
class OutputRequest:
    """One result object: its kind, and for a SEG its encoding."""

    kind: OutputKind
    seg_options: SegOptions = SegOptions()

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output {self.kind!r}; one of {', '.join(OUTPUT_KINDS)}")
        object.__setattr__(self, "kind", OutputKind(self.kind))  # the config's string form

    @property
    def key(self) -> str:
        """The object's name within its job and in the outbox: ``seg`` is the BINARY SEG
        without empty frames; other SEG encodings say how they differ."""
        if self.kind is not OutputKind.SEG:
            return self.kind.value
        options = self.seg_options
        key = "seg" if options.segmentation_type == "BINARY" else f"seg-{options.segmentation_type.lower()}"
        return key if options.omit_empty_frames else f"{key}-all-frames"


def distinct(requests: Iterable[OutputRequest]) -> list[OutputRequest]:
    """Each requested object once, SEGs first (the report may reference one), BINARY first."""
    unique = {request.key: request for request in requests}
    order = {kind: n for n, kind in enumerate(OUTPUT_KINDS)}
    return sorted(unique.values(), key=lambda r: (order[r.kind], r.seg_options.segmentation_type != "BINARY", r.key))
