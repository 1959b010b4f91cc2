"""Errors of the processing pipeline.

``PipelineError`` is the root; every failure a job can end with is one of these, and
its message is the reason recorded in the job:

* ``SeriesError`` - the instances do not form a volume we can segment (with the reason);
  ``TooFewSlicesError``, fewer slices than a volume needs, ends the job ``skipped``
  (a single-slice series is not a failure of the node). ``SeriesTooLargeError``: more
  voxels to decode than the limit allows, found from the headers before any is decoded.
* ``WeightsMissingError`` - the model's weights are not where the config says.
* ``SegmentationError`` - the segmentation model itself failed; ``ModelTimeoutError``,
  it did not answer within its ``timeout_seconds`` (its process was stopped).
* ``SegEncodingError`` - the DICOM SEG could not be built or failed its geometry check.
"""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "SeriesError",
    "TooFewSlicesError",
    "SeriesTooLargeError",
    "WeightsMissingError",
    "SegmentationError",
    "ModelTimeoutError",
    "SegEncodingError",
    "error_of_kind",
]


class PipelineError(Exception):
    """Root of the pipeline's errors."""


class SeriesError(PipelineError):
    """The series cannot be assembled into a single 3D volume."""


class TooFewSlicesError(SeriesError):
    """Fewer slices than ``pipeline.min_slices``: not a volume (the job is skipped, not failed)."""


class SeriesTooLargeError(SeriesError):
    """More voxels to decode than the limit per series: memory is bounded before decoding."""


class WeightsMissingError(PipelineError):
    """Model weights are missing at the configured path."""


class SegmentationError(PipelineError):
    """The segmentation model failed."""


class ModelTimeoutError(SegmentationError):
    """The model did not answer within its deadline: a hung GPU or a lost task must not
    hold the processing slot forever (the job gets one more try, then fails)."""


class SegEncodingError(PipelineError):
    """The DICOM SEG could not be encoded or does not match its source."""


def error_of_kind(kind: str, message: str) -> PipelineError:
    """The ``PipelineError`` named ``kind`` (as another process reported it), else a
    ``SegmentationError``: only this module's error classes are ever made."""
    cls = globals().get(kind) if kind in __all__ else None
    if not (isinstance(cls, type) and issubclass(cls, PipelineError)):
        cls = SegmentationError
    return cls(message)
