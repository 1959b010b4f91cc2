"""Closed planar contours of a label map, slice by slice (the RTSTRUCT's ROIs, and the
report's areas when no SEG is made).

Contours are scikit-image's ``measure.find_contours`` at level 0.5 (marching squares),
not OpenCV or rt-utils: the boundary between pixel centres with sub-pixel vertices, so a
reader that fills the polygon by pixel centre gets the mask back exactly (OpenCV traces
the centres of the border pixels, which loses half a pixel all around; rt-utils is built
on OpenCV and would add a dependency that pins its own pydicom). ``_contours`` computes
them with numpy, every square of the image at once: the same segments (skimage's table,
low values fully connected), joined into the same closed contours, each starting where
find_contours' assembly starts it (at the end of the contour's last segment in scan
order) and listed in the same order (by their first segment); find_contours joins its
segments one by one in Python, which was most of the RTSTRUCT's time. Vertices where the
outline goes straight on are dropped, which keeps the polygon exact (skimage's
``approximate_polygon`` does the same with tolerance 0, but in pure Python, a hundred
times slower).

Holes (a ring such as the skull around the brain on a sagittal slice) are written as
one polygon per connected piece, with each hole joined to its outline by a zero-width
cut ("keyhole"): readers disagree on overlapping contours (plastimatch ORs them by
default, others XOR them), and a keyhole polygon means the same to both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import points_in_poly

from pipeline.input.series import Series
from pipeline.model.types import LabelMap
from pipeline.outputs.common import OutputEncodingError, present_labels

__all__ = ["Contour", "structure_contours", "patient_points", "patient_points_of"]


@dataclass(frozen=True)
class Contour:
    """One closed polygon of a structure on slice ``index`` of the volume, in (row,
    column) pixel coordinates of that slice (pixel centres at integers); holes are
    joined to their outline by a zero-width cut."""

    index: int
    points: np.ndarray  # (n, 2), float, not repeating the first point


# Marching squares as skimage's find_contours does them (fully_connected="low"): per
# square case (ul + 2 ur + 4 ll + 8 lr, a corner counting when above the level), the
# edges (top, bottom, left, right) where its first and its second segment start and end,
# the region above the level on the right of each segment; -1: no segment.
_TOP, _BOTTOM, _LEFT, _RIGHT = 0, 1, 2, 3
_FIRST_SEGMENT = np.full((16, 2), -1, np.intp)
_SECOND_SEGMENT = np.full((16, 2), -1, np.intp)
for _case, _segments in {
    1: ((_TOP, _LEFT),), 2: ((_RIGHT, _TOP),), 3: ((_RIGHT, _LEFT),), 4: ((_LEFT, _BOTTOM),),
    5: ((_TOP, _BOTTOM),), 6: ((_RIGHT, _TOP), (_LEFT, _BOTTOM)), 7: ((_RIGHT, _BOTTOM),),
    8: ((_BOTTOM, _RIGHT),), 9: ((_TOP, _LEFT), (_BOTTOM, _RIGHT)), 10: ((_BOTTOM, _TOP),),
    11: ((_BOTTOM, _LEFT),), 12: ((_LEFT, _RIGHT),), 13: ((_TOP, _RIGHT),), 14: ((_LEFT, _TOP),),
}.items():
    _FIRST_SEGMENT[_case] = _segments[0]
    if len(_segments) > 1:
        _SECOND_SEGMENT[_case] = _segments[1]
del _case, _segments


def _contours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``find_contours(image, 0.5)`` of a boolean image whose border is background, as
    (vertices, starts): every contour's vertices (row, column) one after the other, each
    without its repeated first vertex, and where each contour starts.

    A vertex lies on a pixel edge and is numbered by it: the horizontal edge from (r, c)
    to (r, c + 1) is r * width + c, at (r, c + 0.5); the vertical edge from (r, c) to
    (r + 1, c) is rows * width + r * width + c, at (r + 0.5, c). Each vertex starts one
    segment and ends another, so the segments form closed rings; find_contours, joining
    the segments in scan order, starts a ring at the end of its last segment and lists
    the rings by their first segment."""
    rows, width = image.shape
    pixels = image.astype(np.uint8)
    case = (pixels[:-1, :-1] + 2 * pixels[:-1, 1:] + 4 * pixels[1:, :-1] + 8 * pixels[1:, 1:]).ravel()
    squares = np.flatnonzero((case != 0) & (case != 15))
    cases = case[squares]
    two = _SECOND_SEGMENT[cases, 0] >= 0
    per_square = np.repeat(np.arange(len(squares)), 1 + two)  # segments in scan order
    second = np.zeros(len(per_square), bool)
    second[np.cumsum(1 + two)[two] - 1] = True
    segment_cases = cases[per_square]
    edges = np.where(second[:, None], _SECOND_SEGMENT[segment_cases], _FIRST_SEGMENT[segment_cases])
    row, column = np.divmod(squares[per_square], width - 1)
    plane = rows * width
    edge_offset = np.array([0, width, plane, plane + 1])  # top, bottom, left, right of square (r, c)
    corner = row * width + column
    begin = edge_offset[edges[:, 0]] + corner
    end = edge_offset[edges[:, 1]] + corner
    count = len(begin)
    segment = np.arange(count)
    by_begin = np.argsort(begin)
    at = np.minimum(np.searchsorted(begin, end, sorter=by_begin), max(count - 1, 0))
    following = by_begin[at]
    if count and not np.array_equal(begin[following], end):
        raise OutputEncodingError("a contour runs off the image (its border must be background)")
    # the first and the last segment of each ring: minimum and maximum over ever longer
    # runs of following segments, until a run covers its ring
    first, last, jump = segment, segment, following
    while True:
        longer_first, longer_last = np.minimum(first, first[jump]), np.maximum(last, last[jump])
        if np.array_equal(longer_first, first) and np.array_equal(longer_last, last):
            break
        first, last, jump = longer_first, longer_last, jump[jump]
    # steps from each segment to the last of its ring (list ranking by pointer jumping)
    is_last = last == segment
    to_last = (~is_last).astype(np.intp)
    jump = np.where(is_last, segment, following)
    while True:
        further = jump[jump]
        if np.array_equal(further, jump):
            break
        to_last = to_last + to_last[jump]
        jump = further
    order = np.lexsort((-to_last, first))
    vertex = begin[order]
    horizontal = vertex < plane
    vertex_row, vertex_column = np.divmod(np.where(horizontal, vertex, vertex - plane), width)
    points = np.empty((count, 2))
    points[:, 0] = vertex_row + np.where(horizontal, 0.0, 0.5)
    points[:, 1] = vertex_column + np.where(horizontal, 0.5, 0.0)
    ring_of = first[order]
    starts = np.flatnonzero(np.concatenate([[True], ring_of[1:] != ring_of[:-1]])) if count else np.zeros(0, np.intp)
    return points, starts


def _signed_area(points: np.ndarray) -> float:
    r, c = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(r[:-1], c[1:]) - np.dot(r[1:], c[:-1]) + r[-1] * c[0] - r[0] * c[-1])


def _turns(points: np.ndarray, ring_of: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Which vertices of the closed polygons ``points`` (polygon ``ring_of[i]`` starting
    at ``starts``) are neither repeated nor straight-through."""
    index = np.arange(len(points))
    ring_start = starts[ring_of]
    ring_end = np.append(starts[1:], len(points))[ring_of]
    step = points[np.where(index + 1 == ring_end, ring_start, index + 1)] - points  # from vertex i to the next
    step_in = step[np.where(index == ring_start, ring_end - 1, index - 1)]
    cross = step_in[:, 0] * step[:, 1] - step_in[:, 1] * step[:, 0]
    dot = (step_in * step).sum(axis=1)
    repeated = np.abs(step_in).sum(axis=1) < 1e-9
    straight = (np.abs(cross) < 1e-9) & (dot > 0)
    return ~(repeated | straight)


def _keyhole(outline: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """``outline`` with every hole spliced in through a cut between their closest vertices."""
    polygon = outline
    for hole in sorted(holes, key=lambda h: float(h[:, 0].min())):
        distances = ((polygon[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        rotated = np.concatenate([hole[j:], hole[:j + 1]])  # the hole from its closest vertex, closed
        polygon = np.concatenate([polygon[:i + 1], rotated, polygon[i:]])
    return polygon


def _assemble(outlines: list[np.ndarray], holes: list[np.ndarray]) -> list[np.ndarray]:
    """One polygon per outline, each hole keyholed into the smallest outline around it."""
    if not holes:
        return outlines
    areas = [abs(_signed_area(o)) for o in outlines]
    owned: dict[int, list[np.ndarray]] = {i: [] for i in range(len(outlines))}
    for hole in holes:
        inside = [i for i, outline in enumerate(outlines) if points_in_poly(hole[:1], outline)[0]]
        if not inside:
            raise OutputEncodingError("a hole of a structure lies outside every outline of it")
        owned[min(inside, key=lambda i: areas[i])].append(hole)
    return [_keyhole(outline, owned[i]) for i, outline in enumerate(outlines)]


def _rings(image: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(outlines, holes): the closed boundaries of the foreground of a 2D boolean image
    whose border is background, without repeated or straight-through vertices, in
    find_contours' order."""
    points, starts = _contours(image)
    if not len(points):
        return [], []
    ring_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(points))))
    kept = _turns(points, ring_of, starts)
    points, ring_of = points[kept], ring_of[kept]
    sizes = np.bincount(ring_of, minlength=len(starts))
    # twice the signed area of each ring (exact: the vertices are on a half-pixel grid)
    ends = np.cumsum(sizes)
    index = np.arange(len(points))
    following = np.where(index + 1 == ends[ring_of], ends[ring_of] - sizes[ring_of], index + 1)
    r, c = points[:, 0], points[:, 1]
    areas = np.bincount(ring_of, weights=r * c[following] - r[following] * c, minlength=len(starts))
    outlines, holes = [], []
    for ring, size, area in zip(np.split(points, ends[:-1]), sizes.tolist(), areas.tolist()):
        if size < 3:
            continue
        # find_contours turns around foreground one way and around holes the other
        (outlines if area < 0 else holes).append(ring)
    return outlines, holes


def _slice_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (row, column) of a 2D boolean mask, holes keyholed into their outline."""
    outlines, holes = _rings(np.pad(mask.astype(bool), 1))
    return _assemble([o - 1.0 for o in outlines], [h - 1.0 for h in holes])


def structure_contours(
    label_map: LabelMap, labels: list[int] | None = None, *, joined: bool = False
) -> dict[int, list[Contour]]:
    """label -> its closed planar contours, slice by slice, for ``labels`` (default:
    every label present). ``joined``: one polygon per slice, its pieces joined by
    zero-width cuts like its holes (fewer, larger contours for the same region).

    Each structure's slices are traced in one call: its bounding box on every slice,
    stacked into one image with a background row between slices (tracing costs a fixed
    overhead per call, which thousands of small slices would pay each)."""
    array = label_map.array
    boxes = ndimage.find_objects(array)
    contours: dict[int, list[Contour]] = {}
    for label in present_labels(label_map) if labels is None else labels:
        zs, ys, xs = boxes[label - 1]
        crop = array[zs, ys, xs] == label
        count, height, width = crop.shape
        stacked = np.zeros((count, height + 1, width + 2), bool)
        stacked[:, :height, 1:-1] = crop
        mosaic = np.concatenate([np.zeros((1, width + 2), bool), stacked.reshape(-1, width + 2)])
        # slice i occupies rows 1 + i*(height+1) .. i*(height+1) + height of the mosaic
        pieces: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        outlines, holes = _rings(mosaic)
        for kind, rings in ((0, outlines), (1, holes)):
            for ring in rings:
                index = int((ring[:, 0].min() - 0.5) // (height + 1))
                local = ring - np.array([1.0 + index * (height + 1) - ys.start, 1.0 - xs.start])
                pieces.setdefault(index, ([], []))[kind].append(local)
        found = []
        for index in sorted(pieces):
            polygons = _assemble(*pieces[index])
            if joined and len(polygons) > 1:
                polygons = [_keyhole(polygons[0], polygons[1:])]
            found += [Contour(zs.start + index, polygon) for polygon in polygons]
        contours[label] = found
    return contours


def patient_points(series: Series, contour: Contour) -> np.ndarray:
    """The contour's vertices in patient coordinates (LPS, mm), (n, 3)."""
    return patient_points_of(series, [contour])[0]


def patient_points_of(series: Series, contours: list[Contour]) -> list[np.ndarray]:
    """``patient_points`` of each contour, computed for all of them at once."""
    if not contours:
        return []
    row_spacing, column_spacing = series.pixel_spacing
    along_row = np.asarray(series.row_direction, float) * column_spacing  # one column further
    along_column = np.asarray(series.column_direction, float) * row_spacing  # one row further
    points = np.concatenate([contour.points for contour in contours])
    sizes = [len(contour.points) for contour in contours]
    origins = np.repeat(np.asarray([series.slices[contour.index].position for contour in contours], float),
                        sizes, axis=0)
    rows, columns = points[:, 0:1], points[:, 1:2]
    return np.split(origins + columns * along_row + rows * along_column, np.cumsum(sizes)[:-1])
