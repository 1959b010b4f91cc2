"""What a reviewer scrolls through before a held result is sent: every plane of the
source series, in slice order, with the segments of the job's SEG drawn over it as the
overlay series draws them (``pipeline.outputs.overlay.draw_structures``: the same window,
fill, outline and colours), one PNG per plane.

The SEG is read back (highdicom) onto the source planes it references; a plane it has no
frame on (empty frames are left out) is drawn without structures. Only MR images
without burned-in annotation are drawn (``load_series`` takes MR image planes only; a
plane marked BurnedInAnnotation YES refuses the whole stack), as for the status page's
preview.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.errors import PipelineError, SeriesError
from pipeline.input.series import Series, load_series
from pipeline.input.volume import read_volume
from pipeline.outputs.overlay import draw_structures, grey_levels, source_window

__all__ = ["ReviewStack", "load_review_stack", "NotReviewable", "SEG_CLASSES"]

log = logging.getLogger(__name__)

SEG_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
})


class NotReviewable(PipelineError):
    """The series cannot be shown (no MR image planes, burned-in annotation, undecodable)."""


@dataclass(frozen=True)
class ReviewStack:
    """A series' planes in grey and the SEG's segments on each, ready to draw."""

    grey: np.ndarray  # (planes, rows, columns) uint8: the planes in the overlay series' window of the volume
    labels: np.ndarray  # (planes, rows, columns) segment numbers, 0: none (uint8 unless more than 255)
    colours: np.ndarray  # (highest segment number + 1, 3) uint8 RGB
    names: dict[int, str]  # segment number -> its label
    aspect: float  # row spacing over column spacing: the picture is stretched to square pixels
    has_seg: bool  # False: no SEG was given, the planes are drawn without structures

    @property
    def count(self) -> int:
        return len(self.grey)

    def labelled_planes(self) -> list[int]:
        """The planes (0-based) with a segment on them."""
        return [int(k) for k in np.flatnonzero(self.labels.reshape(self.count, -1).any(axis=1))]

    def png(self, index: int) -> bytes:
        """Plane ``index`` (0-based, slice order) with its segments drawn over it, as PNG."""
        from PIL import Image

        if not 0 <= index < self.count:
            raise IndexError(f"plane {index} is outside 0..{self.count - 1}")
        rgb = draw_structures(self.grey[index], self.labels[index], self.colours, (0.0, 255.0))
        image = Image.fromarray(rgb, "RGB")
        if abs(self.aspect - 1.0) > 0.01:
            image = image.resize((image.width, max(1, round(image.height * self.aspect))),
                                 Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def load_review_stack(paths: Sequence[Path], seg_path: Path | None) -> ReviewStack:
    """The planes of the series in ``paths`` and, if given, the segments of the SEG at
    ``seg_path`` on them. A 4D series shows its first volume."""
    try:
        try:
            series = load_series(paths)
        except SeriesError:
            series = load_series(paths, four_d="first")
    except SeriesError as exc:
        raise NotReviewable(f"the series cannot be shown: {exc}") from exc
    if any(str(plane.header.get("BurnedInAnnotation", "") or "").strip().upper() == "YES" for plane in series.slices):
        raise NotReviewable("the series' images carry burned-in annotation; they are not shown")
    # kept as grey levels (a byte a voxel), not as decoded (four): a reviewer may hold a few series
    image = read_volume(series).image
    volume = sitk.GetArrayViewFromImage(image)  # (planes, rows, columns): no copy, while ``image`` lives
    window = source_window(volume)
    grey = np.empty(volume.shape, np.uint8)
    for start in range(0, len(grey), 32):
        grey[start:start + 32] = grey_levels(volume[start:start + 32], window)
    del volume, image
    labels = np.zeros(grey.shape, np.uint8)
    names: dict[int, str] = {}
    colours = np.zeros((1, 3), np.uint8)
    if seg_path is not None:
        labels, names, colours = _seg_on_series(seg_path, series)
    row, column = series.pixel_spacing
    return ReviewStack(grey=grey, labels=labels, colours=colours, names=names,
                       aspect=row / column if column > 0 else 1.0, has_seg=seg_path is not None)


def _seg_on_series(seg_path: Path, series: Series) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    """The SEG's segments on each plane of ``series`` (one label image per plane), their
    names and their colours (the SEG's recommended display colour)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    names, rgb = {}, {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        names[number] = str(item.SegmentLabel)
        value = item.get("RecommendedDisplayCIELabValue")
        if value is not None:
            rgb[number] = hd.color.CIELabColor.from_dicom_value(tuple(value)).to_rgb()
    colours = np.zeros((max(names, default=0) + 1, 3), np.uint8)
    for number in names:
        colours[number] = rgb.get(number, _FALLBACK[(number - 1) % len(_FALLBACK)])
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for series_item in seg.ReferencedSeriesSequence for item in series_item.ReferencedInstanceSequence}
    labels = np.zeros((len(series.slices), series.rows, series.columns),
                      np.uint8 if max(names, default=0) < 256 else np.uint16)
    options = dict(combine_segments=True, relabel=False, skip_overlap_checks=True, assert_missing_frames_are_empty=True)
    for index, plane in enumerate(series.slices):
        if plane.sop_instance_uid not in referenced:
            continue  # the SEG was made from other images
        try:
            if plane.frame_number is None:
                array = seg.get_pixels_by_source_instance([plane.sop_instance_uid], **options)[0]
            else:
                array = seg.get_pixels_by_source_frame(plane.sop_instance_uid, [plane.frame_number], **options)[0]
        except (KeyError, ValueError, RuntimeError) as exc:  # no frame of the SEG on this plane
            log.debug("review: no segment on plane %d: %s", index + 1, exc)
            continue
        if array.shape == labels.shape[1:]:
            labels[index] = array
    return labels, names, colours


# Colours for segments whose SEG gives none (tab10), as the status page's preview
_FALLBACK = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
             (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
