"""Encoding the label map as a secondary-capture overlay series that every PACS shows.

One Secondary Capture Image (RGB) per source plane, in slice order: the source grey
values (windowed from the volume's 1st to its 99th percentile) with every structure
drawn over them as a translucent fill and an opaque outline in its colour (the SEG's),
a legend of the structures on that slice, and "Automatic research segmentation, not for
diagnosis" burned in (BurnedInAnnotation YES). The legend and the text sit on a panel to
the right of and a band below the image, never over it: pixel (row, column) of the
image part is pixel (row, column) of the source plane, so the image keeps the source's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing. The Secondary Capture
Image IOD has no Frame of Reference or Image Plane module; these attributes (and
FrameOfReferenceUID) are written as standard extended attributes, which dciodvfy accepts
(it reports no error), so a viewer that uses them can place and cross-reference the
images. Each image references its source plane (SourceImageSequence).

Classic single-frame Secondary Capture is used rather than Multi-frame True Color
Secondary Capture: one image per source plane is what is asked for, and every PACS and
viewer displays it. Text is drawn with Pillow's built-in bitmap font (no font files),
scaled by a whole factor on large matrices so that it stays legible.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID

from pipeline.input.series import Series, Slice
from pipeline.input.volume import Volume, read_volume
from pipeline.model.types import LabelMap
from pipeline.outputs import common
from pipeline.outputs.common import Algorithm, OutputEncodingError

__all__ = [
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "DISCLAIMER",
    "encode_overlay",
    "iter_overlay",
    "check_overlay_geometry",
    "image_area",
    "source_window",
    "grey_levels",
    "draw_structures",
]

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
DISCLAIMER = "Automatic research segmentation, not for diagnosis"
POSITION_TOLERANCE_MM = 0.01
FILL_OPACITY = 0.4
PERCENTILES = (1.0, 99.0)
# Part of the UIDs: a change in how the overlay is drawn is a change of content.
_STYLE = f"fill {FILL_OPACITY}, outline, legend right, text below, window {PERCENTILES}"
_LEGEND_CHARACTERS = 26  # a structure name longer than this is shortened in the legend (display only)
_CHARACTER_WIDTH, _LINE_HEIGHT = 6, 13  # Pillow's bitmap font, one line with its spacing
_MARGIN = 4
_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _IMAGE_POSITION, _SOURCE_IMAGE_SEQUENCE, _PIXEL_DATA = (
    Tag("SOPInstanceUID"), Tag("InstanceNumber"), Tag("ImagePositionPatient"), Tag("SourceImageSequence"),
    Tag("PixelData"))
_REFERENCED_SOP_CLASS_UID, _REFERENCED_SOP_INSTANCE_UID, _REFERENCED_FRAME_NUMBER = (
    Tag("ReferencedSOPClassUID"), Tag("ReferencedSOPInstanceUID"), Tag("ReferencedFrameNumber"))
_PLANES_AT_ONCE = 32  # drawn together: numpy's per-call cost shared, the memory of a few planes only


def image_area(rows: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of the whole overlay image for a source plane of rows x columns:
    the source plane at the top left, the legend panel to its right, the text band below."""
    scale = _scale(rows, columns)
    return rows + _band_height(scale), columns + _panel_width(scale)


def _scale(rows: int, columns: int) -> int:
    return max(1, min(rows, columns) // 256)


def _panel_width(scale: int) -> int:
    return scale * (2 * _MARGIN + _LINE_HEIGHT + _LEGEND_CHARACTERS * _CHARACTER_WIDTH)


def _band_height(scale: int) -> int:
    return scale * (_LINE_HEIGHT + 2 * _MARGIN)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def _text_layer(width: int, height: int, scale: int, draw) -> np.ndarray:
    """An RGB array drawn at 1/scale and enlarged by a whole factor (the bitmap font has
    one size)."""
    small = Image.new("RGB", (width // scale, height // scale), (0, 0, 0))
    draw(ImageDraw.Draw(small))
    if scale > 1:
        small = small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)
    layer = np.zeros((height, width, 3), np.uint8)
    layer[: small.height, : small.width] = np.asarray(small)
    return layer


def _legend(entries: tuple[tuple[str, tuple[int, int, int]], ...], height: int, scale: int) -> np.ndarray:
    width = _panel_width(scale)

    def draw(canvas: ImageDraw.ImageDraw) -> None:
        room = max(1, (height // scale - 2 * _MARGIN) // _LINE_HEIGHT)
        shown = entries if len(entries) <= room else entries[: room - 1]
        y = _MARGIN
        for name, rgb in shown:
            canvas.rectangle([_MARGIN, y + 1, _MARGIN + 9, y + 10], fill=rgb)
            text = name if len(name) <= _LEGEND_CHARACTERS else name[: _LEGEND_CHARACTERS - 2] + ".."
            canvas.text((_MARGIN + _LINE_HEIGHT, y), text, fill=(255, 255, 255), font=_font())
            y += _LINE_HEIGHT
        if len(shown) < len(entries):
            canvas.text((_MARGIN, y), f"+{len(entries) - len(shown)} more", fill=(255, 255, 255), font=_font())

    return _text_layer(width, height, scale, draw)


def _disclaimer(width: int, scale: int) -> np.ndarray:
    def draw(canvas: ImageDraw.ImageDraw) -> None:
        canvas.text((_MARGIN, _MARGIN), DISCLAIMER, fill=(255, 255, 0), font=_font())

    return _text_layer(width, _band_height(scale), scale, draw)


def _window(array: np.ndarray) -> tuple[float, float]:
    low, high = (float(v) for v in np.percentile(array, PERCENTILES))
    return low, high if high > low else low + 1.0


def _grey(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    scaled = plane - low
    scaled *= 255.0 / (high - low)
    np.clip(scaled, 0, 255, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of a structure with a 4-neighbour outside it (or at the edge of the
    image), in every plane of ``labels`` (..., rows, columns)."""
    pad = [(0, 0)] * (labels.ndim - 2) + [(1, 1), (1, 1)]
    padded = np.pad(labels, pad)
    centre = padded[..., 1:-1, 1:-1]
    edge = ((padded[..., :-2, 1:-1] != centre) | (padded[..., 2:, 1:-1] != centre)
            | (padded[..., 1:-1, :-2] != centre) | (padded[..., 1:-1, 2:] != centre))
    return edge & (labels > 0)


def _draw(image: np.ndarray, grey: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> None:
    """``image`` (..., rows, columns, 3): the planes ``grey`` with the structures drawn
    over them, filled (translucent) and outlined (opaque). Drawn channel by channel
    (a boolean selection of single bytes is several times faster than one of pixels)."""
    inside = labels > 0
    edge = _outline(labels)
    weight = round(FILL_OPACITY * 100)
    under = grey[inside].astype(np.uint16) * (100 - weight) + 50
    filled, outlined = labels[inside], labels[edge]
    for channel in range(3):
        colour = colours[:, channel]
        drawn = grey.copy()
        drawn[inside] = (under + colour[filled].astype(np.uint16) * weight) // 100
        drawn[edge] = colour[outlined]
        image[..., channel] = drawn


def source_window(pixels: np.ndarray) -> tuple[float, float]:
    """The grey window the overlay series uses for a volume: its 1st to 99th percentile."""
    return _window(np.asarray(pixels))


def grey_levels(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Source planes as the overlay series shows them: 0..255 (uint8) over ``window``."""
    return _grey(np.array(pixels, dtype=np.float32), window)


def draw_structures(pixels: np.ndarray, labels: np.ndarray, colours: np.ndarray,
                    window: tuple[float, float]) -> np.ndarray:
    """Source planes (..., rows, columns) in grey (``window``, see ``source_window``) with
    the structures of ``labels`` drawn over them as the overlay series draws them
    (translucent fill, opaque outline; ``colours``: RGB by label number, uint8), as
    (..., rows, columns, 3) uint8, without legend or text: what a reviewer scrolls through.
    Planes already in grey levels (``grey_levels``, uint8) are drawn as they are."""
    grey = pixels if pixels.dtype == np.uint8 else grey_levels(pixels, window)
    image = np.empty((*grey.shape, 3), np.uint8)
    _draw(image, grey, labels, colours)
    return image


def _labels_per_plane(labels: np.ndarray) -> list[tuple[int, ...]]:
    """The labels present on each plane of ``labels`` (planes, rows, columns), ascending."""
    planes = len(labels)
    flat = labels.reshape(planes, -1)
    labelled = flat != 0
    values = flat[labelled].astype(np.intp)  # plane by plane, as boolean selection goes in order
    plane_of = np.repeat(np.arange(planes), np.count_nonzero(labelled, axis=1))
    span = int(values.max()) + 1 if values.size else 1
    present = np.bincount(plane_of * span + values, minlength=planes * span).reshape(planes, span) > 0
    return [tuple(int(label) for label in np.flatnonzero(row)) for row in present]


def _patient_orientation(direction: tuple[float, float, float]) -> str:
    """Letters of a direction (LPS), the main one first, then any other component over 0.1."""
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    order = np.argsort(-np.abs(direction))
    return "".join(letters[axis][0 if direction[axis] > 0 else 1] for axis in order
                   if axis == order[0] or abs(direction[axis]) > 0.1)


def _check_source(label_map: LabelMap, source: Volume) -> None:
    ours = [(s.sop_instance_uid, s.frame_number) for s in label_map.volume.series.slices]
    theirs = [(s.sop_instance_uid, s.frame_number) for s in source.series.slices]
    if ours != theirs:
        raise OutputEncodingError("the overlay's source volume is not the volume of the label map")


def encode_overlay(
    label_map: LabelMap, algorithm: Algorithm, *, source: Volume | None = None
) -> list[Dataset] | None:
    """One RGB Secondary Capture image per source plane, in slice order; None when no
    label is present.

    ``source`` is the volume as acquired (the label map's own volume may be the
    preprocessed one, inverted): None decodes it again from the series' files."""
    images = list(iter_overlay(label_map, algorithm, source=source))
    if not images:
        return None
    check_overlay_geometry(images, label_map)
    return images


def iter_overlay(
    label_map: LabelMap, algorithm: Algorithm, *, source: Volume | None = None
) -> Iterator[Dataset]:
    """``encode_overlay``'s images one at a time, each checked against its source plane
    as it is made (none when no label is present): a caller that saves each and lets it
    go holds a few planes, never the whole overlay, the largest object of a series (three
    bytes a pixel, one image per source plane)."""
    present = common.present_labels(label_map)
    if not present:
        return
    series = label_map.volume.series
    if source is None:
        source = read_volume(series)
    _check_source(label_map, source)
    pixels = sitk.GetArrayViewFromImage(source.image)  # read only here: no copy
    window = _window(pixels)
    infos = common.structure_infos(label_map, present)
    colours = np.zeros((int(label_map.array.max()) + 1, 3), np.uint8)
    for label, info in infos.items():
        colours[label] = info.rgb

    rows, columns = series.rows, series.columns
    scale = _scale(rows, columns)
    height, width = image_area(rows, columns)
    band = _disclaimer(width, scale)
    legends: dict[tuple[int, ...], np.ndarray] = {}

    identity = common.output_identity(label_map, algorithm, "OVERLAY", style=_STYLE)
    shared = list(_common_attributes(label_map, algorithm, identity, height, width))
    orientation = np.asarray((*series.row_direction, *series.column_direction), float)
    # a few planes at a time, each step on all of them at once: the source planes in
    # grey, the structures over them, the legend of each plane's structures to the
    # right, the text below
    for start in range(0, len(series.slices), _PLANES_AT_ONCE):
        planes = slice(start, start + _PLANES_AT_ONCE)
        labels = label_map.array[planes]
        grey = _grey(pixels[planes], window)
        canvas = np.zeros((len(labels), height, width, 3), np.uint8)
        _draw(canvas[:, :rows, :columns], grey, labels, colours)
        for offset, here in enumerate(_labels_per_plane(labels)):
            if here not in legends:
                entries = tuple((infos[label].name, infos[label].rgb) for label in here)
                legends[here] = _legend(entries, height, scale)
            canvas[offset, :, columns:] = legends[here]
        np.maximum(canvas[:, rows:], band[: height - rows], out=canvas[:, rows:])
        for offset in range(len(labels)):
            image = _image(shared, series, start + offset, identity, canvas[offset])
            _check_image(image, start + offset + 1, series.slices[start + offset], orientation)
            yield image


def _common_attributes(label_map: LabelMap, algorithm: Algorithm, identity: str, height: int, width: int) -> Dataset:
    series = label_map.volume.series
    header = series.header
    now = datetime.datetime.now()
    ds = common.patient_and_study(header)
    ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.Modality = "OT"
    # Type 2C (a paired body part): the source's, else empty; dciodvfy wants it present
    ds.Laterality = header.get("Laterality")
    ds.SeriesInstanceUID = common.output_uid(identity, "OVERLAY", "series")
    ds.SeriesNumber = common.output_series_number(series, "OVERLAY", algorithm)
    ds.SeriesDescription = common.output_description(algorithm, "OVERLAY")
    ds.Manufacturer = "dicom-node"
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = "dicom-node"
    ds.SecondaryCaptureDeviceManufacturerModelName = common.checked_length(algorithm.name, 64, "the algorithm name")
    ds.SecondaryCaptureDeviceSoftwareVersions = common.checked_length(algorithm.software_version, 64, "the software version")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.DerivationDescription = common.checked_length(
        f"Source image with an automatic segmentation drawn over it: {algorithm.name} {algorithm.task},"
        f" {algorithm.sequence_class}, {algorithm.preprocessing}", 1024, "the derivation description")
    ds.ImageComments = f"{DISCLAIMER}. Classification: {algorithm.classification}"
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    if header.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = header.FrameOfReferenceUID
    ds.ImageOrientationPatient = [round(float(v), 10) for v in (*series.row_direction, *series.column_direction)]
    ds.PixelSpacing = [float(v) for v in series.pixel_spacing]
    ds.PatientOrientation = [_patient_orientation(series.row_direction), _patient_orientation(series.column_direction)]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def _copied(element: DataElement) -> DataElement:
    """One image's own copy of a common element: a new element, and a new value where
    the value can change in place (a sequence, a list of values)."""
    if element.VR == "SQ":
        return copy.deepcopy(element)
    if isinstance(element.value, MultiValue):
        return DataElement(element.tag, element.VR, list(element.value))
    return copy.copy(element)


def _image(shared: list[DataElement], series: Series, index: int, identity: str, canvas: np.ndarray) -> Dataset:
    plane = series.slices[index]
    sop_instance_uid = common.output_uid(identity, "OVERLAY", f"instance {index + 1}")
    reference = [DataElement(_REFERENCED_SOP_CLASS_UID, "UI", series.header.SOPClassUID),
                 DataElement(_REFERENCED_SOP_INSTANCE_UID, "UI", plane.sop_instance_uid)]
    if plane.frame_number is not None:
        reference.append(DataElement(_REFERENCED_FRAME_NUMBER, "IS", plane.frame_number))
    elements = [
        *(_copied(element) for element in shared),
        DataElement(_SOP_INSTANCE_UID, "UI", sop_instance_uid),
        DataElement(_INSTANCE_NUMBER, "IS", index + 1),
        DataElement(_IMAGE_POSITION, "DS", [round(float(v), 6) for v in plane.position]),
        DataElement(_SOURCE_IMAGE_SEQUENCE, "SQ", DicomSequence([Dataset({e.tag: e for e in reference})])),
        DataElement(_PIXEL_DATA, "OB or OW", canvas.tobytes()),  # OB when written (BitsAllocated 8)
    ]
    ds = Dataset({element.tag: element for element in elements})
    ds.file_meta = common.output_file_meta(SECONDARY_CAPTURE_IMAGE_STORAGE, sop_instance_uid)
    return ds


def check_overlay_geometry(images: list[pydicom.Dataset], label_map: LabelMap) -> None:
    """One image per source plane, in order, each at its plane's position and orientation
    (0.01 mm) and referencing it."""
    series = label_map.volume.series
    if len(images) != len(series.slices):
        raise OutputEncodingError(f"{len(images)} overlay images for {len(series.slices)} source planes")
    orientation = np.asarray((*series.row_direction, *series.column_direction), float)
    for index, (ds, plane) in enumerate(zip(images, series.slices), start=1):
        _check_image(ds, index, plane, orientation)


def _check_image(ds: pydicom.Dataset, index: int, plane: Slice, orientation: np.ndarray) -> None:
    """Overlay image ``index`` (1-based) at its source plane's position and orientation,
    referencing it."""
    if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), orientation, atol=1e-4):
        raise OutputEncodingError(f"overlay image {index}: orientation differs from its source plane")
    position = np.asarray(ds.ImagePositionPatient, float)
    if np.max(np.abs(position - np.asarray(plane.position, float))) > POSITION_TOLERANCE_MM:
        raise OutputEncodingError(f"overlay image {index} lies at {position.tolist()}, its source plane at"
                                  f" {list(plane.position)}")
    [reference] = ds.SourceImageSequence
    if (str(reference.ReferencedSOPInstanceUID), reference.get("ReferencedFrameNumber")) != (
            plane.sop_instance_uid, plane.frame_number):
        raise OutputEncodingError(f"overlay image {index} does not reference its source plane")
