"""What an instance must be to be accepted: checked at the door, answered with the reason.

An image that cannot be processed is refused when it arrives, not accepted and failed
later with a library's message. The checks read the headers and the length of the pixel
data only; no pixel is decoded on the association's thread.

* the dataset cannot be decoded (a truncated transfer): 0xC210, cannot understand;
* an image (it has Rows) without PixelData, or with empty PixelData: 0xA900, the data
  set does not match its SOP class;
* native pixel data whose length is not Rows x Columns x SamplesPerPixel x
  BitsAllocated x NumberOfFrames (one byte of padding allowed): 0xA900;
* encapsulated pixel data that cannot be parsed into fragments, or has fewer fragments
  than frames: 0xA900.

Objects without Rows (a report, a presentation state, raw data) have no pixels to check
and are accepted as before.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pydicom

__all__ = ["Refusal", "CANNOT_UNDERSTAND", "DOES_NOT_MATCH_SOP_CLASS", "CHECKED_KEYWORDS", "instance_problem"]

CANNOT_UNDERSTAND = 0xC210
DOES_NOT_MATCH_SOP_CLASS = 0xA900
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# every element instance_problem reads, so that a caller may decode only these
CHECKED_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames", *_PIXEL_KEYWORDS)


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the DICOM status to answer and the reason to log."""

    status: int
    reason: str


def instance_problem(dataset: pydicom.Dataset, transfer_syntax: str) -> Refusal | None:
    """None when the instance may be stored, else why not. ``transfer_syntax`` is the
    one it arrived in (the presentation context's)."""
    try:
        rows = dataset.get("Rows")
        if rows is None:
            return None
        keyword = next((k for k in _PIXEL_KEYWORDS if k in dataset), None)
        if keyword is None:
            return Refusal(DOES_NOT_MATCH_SOP_CLASS, "an image (Rows present) without PixelData")
        value = dataset[keyword].value
    except Exception as exc:  # a truncated or malformed dataset fails while its elements are read
        return Refusal(CANNOT_UNDERSTAND, f"the dataset cannot be decoded ({type(exc).__name__}: {exc})")
    if not value:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is empty")
    try:
        frames = int(dataset.get("NumberOfFrames") or 1)
        columns = int(dataset.get("Columns") or 0)
        samples = int(dataset.get("SamplesPerPixel") or 1)
        bits = int(dataset.get("BitsAllocated") or 0)
        rows = int(rows)
    except (TypeError, ValueError) as exc:
        return Refusal(CANNOT_UNDERSTAND, f"an image attribute cannot be read as a number ({exc})")
    if pydicom.uid.UID(transfer_syntax).is_encapsulated and keyword == "PixelData":
        return _encapsulated_problem(value, frames)
    if keyword != "PixelData":
        bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}[keyword]
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if len(value) not in (expected, expected + 1):
        return Refusal(
            DOES_NOT_MATCH_SOP_CLASS,
            f"{keyword} has {len(value)} bytes; Rows {rows} x Columns {columns} x SamplesPerPixel {samples}"
            f" x BitsAllocated {bits} x NumberOfFrames {frames} need {expected}",
        )
    return None


def _encapsulated_problem(value: bytes, frames: int) -> Refusal | None:
    try:
        fragments = _fragment_count(value)
    except ValueError as exc:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, f"the encapsulated PixelData cannot be parsed: {exc}")
    if fragments < frames:
        return Refusal(
            DOES_NOT_MATCH_SOP_CLASS,
            f"the encapsulated PixelData has {fragments} fragment(s) for NumberOfFrames {frames}",
        )
    return None


def _fragment_count(value: bytes) -> int:
    """The fragments after the Basic Offset Table item, every item checked to lie
    within the data (pydicom's own generator does not check the last one's length)."""
    offset, items = 0, 0
    while offset < len(value):
        if len(value) - offset < 8:
            raise ValueError(f"an item header is cut short at byte {offset}")
        group, element, length = struct.unpack_from("<HHL", value, offset)
        if (group, element) == (0xFFFE, 0xE0DD):  # the sequence delimiter
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError(f"no item at byte {offset}")
        offset += 8 + length
        if offset > len(value):
            raise ValueError(f"item {items + 1} runs {offset - len(value)} byte(s) past the end")
        items += 1
    if items == 0:
        raise ValueError("no Basic Offset Table item")
    return items - 1
