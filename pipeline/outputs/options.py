"""What a destination asks for: the result objects by kind, and the SEG's encoding.

Plain values with no encoder behind them, so the configuration can name them without
loading highdicom (``dicom_node.config`` imports this module, never the writers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pydicom.uid import ExplicitVRLittleEndian, RLELossless

__all__ = ["OUTPUT_KINDS", "SegOptions", "OutputRequest", "distinct"]

OUTPUT_KINDS = ("seg", "rtstruct", "overlay", "report")


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
        return ExplicitVRLittleEndian if self.segmentation_type == "BINARY" else RLELossless




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


def distinct(requests: Iterable[OutputRequest]) -> list[OutputRequest]:
    """Each requested object once, SEGs first (the report may reference one), BINARY first."""
    unique = {request.key: request for request in requests}
    order = {kind: n for n, kind in enumerate(OUTPUT_KINDS)}
    return sorted(unique.values(), key=lambda r: (order[r.kind], r.seg_options.segmentation_type != "BINARY", r.key))
