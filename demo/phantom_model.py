"""A tiny, synthetic stand-in for TotalSegmentator's ``total`` *fast* model.

Everything in this module is **synthetic and anatomically meaningless**: the model is
trained for a few minutes on procedurally generated "phantoms" (ellipsoids and shells
that look vaguely like a head or a trunk) and exists only so that tests and demos can
run the real TotalSegmentator / nnU-Net inference code path without the real weights
(which cannot be downloaded here). Never use its output for anything clinical.

How it works (see :func:`train_phantom_model`):

1. Phantoms are generated as a *tissue* map (air, fat, soft tissue, bone, CSF, grey and
   white matter, lung, ...) plus a label map using TotalSegmentator ``total`` class ids
   (only a few large classes: brain, skull, spinal cord, one label per spine region,
   lungs, heart, aorta, liver, spleen, kidneys - see :func:`phantom_class_names`).
2. Every phantom is rendered with one of three intensity styles: CT (Hounsfield units),
   an inverted T1-weighted look (a T1-like rendering passed through the preprint's
   inversion, :func:`pipeline.input.preprocess.invert_t1`), or a random intensity remap. The
   last two make the model depend on shapes rather than on exact HU values, so that it
   also finds something (mostly "brain" and "skull") in real inverted T1 brain MRI.
3. nnU-Net v2's own fingerprinting, experiment planning and preprocessing run on the
   phantoms (in a throw-away ``nnUNet_raw``/``nnUNet_preprocessed`` tree); the plans are
   then shrunk to a tiny 3d_fullres U-Net (features 8..64, 48^3 patch, batch size 2) at
   3 mm spacing with CT normalisation.
4. A subclass of ``nnUNetTrainer`` (CPU, AdamW, no mirroring, few iterations, no final
   validation) trains on the compact label set.
5. The checkpoint is expanded to TotalSegmentator's 118 output channels (background +
   117 ``total`` classes; unlearned classes get a very negative bias so they are never
   predicted), stored as float16 without optimizer state (under 2 MB), renamed to
   ``nnUNetTrainer_4000epochs_NoMirroring`` and written, together with ``plans.json``
   and ``dataset.json``, to the folder TotalSegmentator loads for ``task="total",
   fast=True``.

TotalSegmentator's *full* ``total`` task (``fast=False``) runs five part-models
(organs, vertebrae, cardiac, muscles, ribs) at 1.5 mm and merges their labels.
:func:`make_full_total_weights` derives an equally **synthetic** stand-in for those five
from the fast phantom, without training: each part gets the fast checkpoint with its
output rows re-sliced into the part's own label space (the phantom classes of that part
keep their learned rows, all others are never predicted), the part's ``dataset.json``,
and plans at the full task's spacing (with head-sized tiles, cheaper on a CPU). Folder
names, trainer, plans, task ids and part label ids come from TotalSegmentator's own
tables. The network was trained at 3 mm and sees 1.5 mm voxels there, so its labels
differ from the fast phantom's; it exists to run the full task's code path (five
predictors, label merging), not to segment anything.

Two more stand-ins come from the fast phantom the same way (output rows re-sliced, no
training), equally **synthetic**: :func:`make_total_mr_weights` writes the folder
TotalSegmentator loads for ``task="total_mr", fast=True`` (task 852; each ``total_mr``
class takes the phantom's row of the same class, or of one learned class where ``total``
splits it, e.g. ``lung_left`` <- ``lung_upper_lobe_left``), and :func:`make_kidney_model`
a custom nnU-Net model with the labels of a renal tumour model (``kidney_right``,
``kidney_left``, ``kidney_tumor``) whose rows are, on purpose, the phantom's brain, skull
and spinal cord rows, so that it labels something on the brain MRI the tests use.

Steps 1-5 run in a child Python process (``subprocess``, not ``multiprocessing``), so
calling :func:`train_phantom_model` from a plain script without an
``if __name__ == "__main__"`` guard is safe. nnU-Net's paths (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``) go to that child in its own environment,
so the environment and nnU-Net's import-time path globals of the calling process are
left untouched; :func:`segment_with_totalseg` likewise runs TotalSegmentator on the
trained model in a spawned process.

This package is demo tooling, not the product: it is not installed in the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

    from pipeline.labels import SegmentInfo

__all__ = [
    "TOTAL_FAST_DATASET",
    "TOTAL_FAST_TRAINER_DIR",
    "TOTAL_FAST_TRAINER",
    "PHANTOM_KINDS",
    "PHANTOM_STYLES",
    "SPACING_MM",
    "phantom_class_names",
    "make_custom_model",
    "make_full_total_weights",
    "make_kidney_model",
    "KIDNEY_MODEL",
    "KIDNEY_SOURCE_ROWS",
    "make_total_mr_weights",
    "TOTAL_MR_MERGED_ROWS",
    "total_mr_source_rows",
    "CUSTOM_MODEL",
    "total_class_map",
    "make_phantom_anatomy",
    "render_phantom",
    "make_phantom",
    "model_folder",
    "segment_with_totalseg",
    "train_phantom_model",
]

TOTAL_FAST_DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TOTAL_FAST_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
TOTAL_FAST_TRAINER_DIR = f"{TOTAL_FAST_TRAINER}__nnUNetPlans__3d_fullres"

SPACING_MM = 3.0
PHANTOM_KINDS = ("head", "trunk")
PHANTOM_STYLES = ("ct", "inverted_t1", "random")

PhantomKind = Literal["head", "trunk"]
PhantomStyle = Literal["ct", "inverted_t1", "random"]

# Default training settings: about 5 minutes in total on 2 (quiet) CPU cores.
DEFAULT_EPOCHS = 70
DEFAULT_ITERATIONS_PER_EPOCH = 15
DEFAULT_NUM_CASES = 36

_PATCH_SIZE = (48, 48, 48)
_FEATURES = (8, 16, 32, 64, 64)
_UNUSED_CLASS_BIAS = -100.0
# The full task's part-models are never trained, so their tiles need not match training.
# One tile holds a head at 1.5 mm (264 mm up-down and front-back, 192 mm left-right; nnU-Net
# order z, y, x); on the shared T1 series that is 3-5 times faster on a CPU than 48^3 tiles.
_FULL_PATCH_SIZE = (176, 176, 128)
# The same for the untrained 3 mm kidney model: one tile holds a head at 3 mm in any orientation
# (nnU-Net's own path does not reorient; it tiles with step 0.5, TotalSegmentator's with 0.8): on
# the shared T1 series 4 times faster on a CPU than 48^3 tiles.
_KIDNEY_PATCH_SIZE = (96, 96, 96)

# ----------------------------------------------------------------------------------
# Tissues (intensity classes) and labels
# ----------------------------------------------------------------------------------

AIR, FAT, SOFT, CORTICAL, MARROW, CSF, GM, WM, EYE, AIR_IN, LUNG, LIVER, SPLEEN, KIDNEY, \
    BLOOD, BOWEL, CORD = range(17)
_N_TISSUES = 17

# CT (HU): (mean, jitter)
_CT_HU = {
    AIR: (-1000, 0), FAT: (-100, 15), SOFT: (50, 10), CORTICAL: (1100, 300), MARROW: (350, 100),
    CSF: (8, 5), GM: (40, 4), WM: (28, 4), EYE: (10, 5), AIR_IN: (-950, 40), LUNG: (-840, 40),
    LIVER: (60, 15), SPLEEN: (50, 10), KIDNEY: (40, 80), BLOOD: (45, 120), BOWEL: (30, 20),
    CORD: (35, 5),
}
# T1-weighted MR, relative to white matter: (low, high)
_T1_REL = {
    AIR: (0.0, 0.0), FAT: (1.05, 1.5), SOFT: (0.4, 0.65), CORTICAL: (0.01, 0.1), MARROW: (0.7, 1.2),
    CSF: (0.05, 0.25), GM: (0.5, 0.75), WM: (0.85, 1.05), EYE: (0.08, 0.25), AIR_IN: (0.0, 0.04),
    LUNG: (0.02, 0.08), LIVER: (0.55, 0.8), SPLEEN: (0.45, 0.65), KIDNEY: (0.4, 0.65),
    BLOOD: (0.05, 1.0), BOWEL: (0.35, 0.8), CORD: (0.65, 0.9),
}

# Few, large classes: a tiny network learns them within minutes. Vertebrae get one label per
# spine region (not per level), each lung one label.
_HEAD_CLASSES = ["brain", "skull", "spinal_cord", "vertebrae_C5"]
_TRUNK_CLASSES = [
    "lung_upper_lobe_left", "lung_upper_lobe_right", "heart", "aorta", "liver", "spleen",
    "kidney_left", "kidney_right", "spinal_cord", "vertebrae_T8", "vertebrae_L2",
]


def total_class_map() -> dict[int, str]:
    """TotalSegmentator's ``total`` classes (label id -> name, ids 1..117)."""
    from totalsegmentator.map_to_binary import class_map

    return dict(class_map["total"])


def phantom_class_names() -> list[str]:
    """Names of the ``total`` classes that the phantoms contain (the ones that get learned)."""
    names: list[str] = []
    for name in _HEAD_CLASSES + _TRUNK_CLASSES:
        if name not in names:
            names.append(name)
    return names


def _total_ids() -> dict[str, int]:
    return {name: idx for idx, name in total_class_map().items()}


# ----------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation matrix with angles up to ``max_deg`` around each axis."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid(shape: tuple[int, int, int], center_mm: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, ...]:
    """Phantom-frame coordinates (mm) of every voxel; axes are RAS (x right, y anterior, z superior)."""
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * SPACING_MM for n in shape]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([gx, gy, gz]) - center_mm.reshape(3, 1, 1, 1).astype(np.float32)
    rot = rot.astype(np.float32)
    return tuple(np.einsum("ij,j...->i...", rot, pts))


def _ellipsoid(p: tuple[np.ndarray, ...], center, radii) -> np.ndarray:
    x, y, z = p
    return (((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
            + ((z - center[2]) / radii[2]) ** 2) <= 1.0


def _cylinder_z(p: tuple[np.ndarray, ...], center_xy, radii_xy, z_range=(-np.inf, np.inf)) -> np.ndarray:
    x, y, z = p
    return ((((x - center_xy[0]) / radii_xy[0]) ** 2 + ((y - center_xy[1]) / radii_xy[1]) ** 2) <= 1.0) \
        & (z >= z_range[0]) & (z <= z_range[1])


def _edt_inside(mask: np.ndarray) -> np.ndarray:
    """Distance (mm) of voxels inside ``mask`` to the outside (the mask continues beyond the volume)."""
    from scipy.ndimage import distance_transform_edt

    padded = np.pad(mask, 1, mode="edge")
    return distance_transform_edt(padded, sampling=SPACING_MM)[1:-1, 1:-1, 1:-1]


def _default_shape(rng: np.random.Generator, kind: str) -> tuple[int, int, int]:
    if kind == "head":
        return (int(rng.integers(56, 73)), int(rng.integers(68, 89)), int(rng.integers(68, 89)))
    # a small (child-sized) trunk, so that one 48^3 training patch sees most of a cross-section
    return (int(rng.integers(76, 93)), int(rng.integers(60, 73)), int(rng.integers(56, 77)))


# ----------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------


def _head_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ids = _total_ids()
    s = float(rng.normal(1.0, 0.06))
    extent = np.array(shape) * SPACING_MM
    # cranium centre somewhere in the upper/middle part of the field of view
    center = np.array([rng.uniform(-0.05, 0.05) * extent[0],
                       rng.uniform(-0.1, 0.1) * extent[1],
                       rng.uniform(0.0, 0.22) * extent[2]])
    p = _grid(shape, center, _rotation(rng, 12.0))
    x, y, z = p

    tissue = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)

    # cranial cavity: big ellipsoid cut at the skull base, plus posterior fossa, minus orbits region
    r_cav = np.array([rng.uniform(58, 68), rng.uniform(76, 90), rng.uniform(62, 74)]) * s
    cavity = _ellipsoid(p, (0, 0, 10 * s), r_cav) & (z > -28 * s)
    cavity &= ~((y > 38 * s) & (z < 2 * s))
    cavity |= _ellipsoid(p, (0, -42 * s, -26 * s), np.array([48, 34, 24]) * s)
    d_cav = _edt_inside(cavity)
    d_out = _edt_inside(~cavity)

    t_csf = rng.uniform(1.5, 4.5)
    t_gm = rng.uniform(3.5, 7.0)
    t_skull = rng.uniform(5.0, 10.0)
    t_scalp = rng.uniform(4.0, 10.0)

    brainstem = _cylinder_z(p, (0, -14 * s), (12 * s, 11 * s), (-45 * s, 5 * s))
    canal = _cylinder_z(p, (0, -26 * s), (8 * s, 7 * s), (-np.inf, -20 * s))
    cord = _cylinder_z(p, (0, -26 * s), (5 * s, 4.5 * s), (-np.inf, -30 * s))

    cranium_outer = d_out <= t_skull + t_scalp
    face = _ellipsoid(p, (0, 52 * s, -42 * s), np.array([rng.uniform(50, 60), 42, rng.uniform(48, 58)]) * s)
    neck = _cylinder_z(p, (0, -6 * s), (rng.uniform(46, 56) * s, rng.uniform(50, 60) * s), (-np.inf, -20 * s))
    body = cranium_outer | cavity | face | neck
    d_body = _edt_inside(body)

    # soft tissue everywhere, subcutaneous fat rim
    tissue[body] = SOFT
    tissue[body & (d_body <= rng.uniform(3.0, 8.0))] = FAT

    # skull: shell around the cavity, with a diploe (marrow) core; foramen magnum left open
    skull = (~cavity) & (d_out <= t_skull) & ~canal & ~brainstem
    tissue[skull] = CORTICAL
    tissue[skull & (d_out > 0.3 * t_skull) & (d_out < 0.75 * t_skull)] = MARROW
    labels[skull] = ids["skull"]

    # face: eyes, orbital fat, sinuses / nasal cavity, airway
    for sx in (-1, 1):
        eye_c = (sx * 31 * s, 64 * s, -14 * s)
        tissue[_ellipsoid(p, eye_c, np.array([17, 16, 15]) * s) & body] = FAT
        tissue[_ellipsoid(p, eye_c, np.array([12, 12, 12]) * s) & body] = EYE
    tissue[_ellipsoid(p, (0, 58 * s, -44 * s), np.array([rng.uniform(18, 30), 16, 14]) * s) & body] = AIR_IN
    tissue[_cylinder_z(p, (0, 22 * s), (9 * s, 7 * s), (-np.inf, -50 * s)) & body] = AIR_IN

    # brain: grey matter rim, white matter core, ventricles, CSF around
    tissue[cavity] = CSF
    brain = cavity & (d_cav > t_csf)
    tissue[brain] = GM
    tissue[brain & (d_cav > t_csf + t_gm)] = WM
    vent = np.zeros(shape, bool)
    for sx in (-1, 1):
        vent |= _ellipsoid(p, (sx * 9 * s, 2 * s, 18 * s), np.array([5, rng.uniform(16, 26), 9]) * s)
    tissue[vent & brain] = CSF
    labels[brain] = ids["brain"]
    stem = brainstem & (z > -33 * s)
    tissue[stem] = WM
    labels[stem & ~skull] = ids["brain"]

    # cervical spine: vertebral bodies, arches and spinous processes (one label for all levels)
    level_h = rng.uniform(14, 17) * s
    disc = 3.5 * s
    top = -36 * s
    bone = _cylinder_z(p, (0, -4 * s), (10 * s, 9 * s))
    bone |= _cylinder_z(p, (0, -26 * s), (12 * s, 11 * s)) & ~canal
    bone |= (np.abs(x) < 5 * s) & (y < -30 * s) & (y > -48 * s)
    bone &= z < top
    level = np.floor((top - z) / level_h).astype(np.int32)
    in_disc = ((top - z) - level * level_h) > (level_h - disc)
    for i in range(7):
        m = bone & (level == i) & ~in_disc & body
        tissue[m] = MARROW
        tissue[m & (_edt_inside(m) <= 3.0)] = CORTICAL
        labels[m] = ids["vertebrae_C5"]
    tissue[canal & body & (z < -33 * s)] = CSF
    spinal = cord & body & (z < -33 * s)
    tissue[spinal] = CORD
    labels[spinal] = ids["spinal_cord"]

    tissue[~body] = AIR
    labels[~body] = 0
    return tissue, labels


def _trunk_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ids = _total_ids()
    extent = np.array(shape) * SPACING_MM
    center = np.array([rng.uniform(-0.04, 0.04) * extent[0], rng.uniform(-0.06, 0.06) * extent[1], 0.0])
    p = _grid(shape, center, _rotation(rng, 8.0))
    x, y, z = p

    a = rng.uniform(0.85, 1.0) * extent[0] / 2 * 0.92
    b = min(rng.uniform(0.65, 0.8) * a, extent[1] / 2 * 0.92)
    s = a / 150.0 * float(rng.normal(1.0, 0.04))  # organ scale follows the body size
    body = _cylinder_z(p, (0, 0), (a, b))
    d_body = _edt_inside(body)
    t_fat = rng.uniform(5, 22) * s
    t_muscle = rng.uniform(5, 10) * s

    tissue = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    tissue[body] = BOWEL
    tissue[body & (d_body <= t_fat + t_muscle)] = SOFT
    tissue[body & (d_body <= t_fat)] = FAT
    inner = body & (d_body > t_fat + t_muscle)

    z_d = rng.uniform(-0.35, 0.3) * extent[2]  # diaphragm height
    dome = z_d + 25 * s * np.clip(1 - (x / (0.6 * a)) ** 2 - (y / (0.8 * b)) ** 2, 0, 1)
    thorax = inner & (z > dome)
    abdomen = inner & ~thorax

    # random fat / gas blobs in the abdomen (unlabelled bowel)
    for _ in range(int(rng.integers(4, 10))):
        c = (rng.uniform(-0.6, 0.6) * a, rng.uniform(-0.2, 0.6) * b, rng.uniform(-0.5, 0.5) * extent[2])
        blob = _ellipsoid(p, c, rng.uniform(10, 30, size=3) * s) & abdomen
        tissue[blob] = FAT if rng.random() < 0.6 else AIR_IN

    y_spine = -b + t_fat + t_muscle + 45 * s
    # heart, aorta, lungs
    heart = _ellipsoid(p, (-22 * s, 0.25 * b, z_d + 55 * s), np.array([58, 48, 52]) * s) & thorax
    aorta = _cylinder_z(p, (-18 * s, y_spine + 28 * s), (11 * s, 11 * s)) & inner
    tissue[heart] = BLOOD
    labels[heart] = ids["heart"]
    for sx, side in ((1, "right"), (-1, "left")):
        lung = _cylinder_z(p, (sx * 0.45 * a, -0.05 * b), (0.4 * a, 0.72 * b)) & thorax
        lung &= ~_ellipsoid(p, (-22 * s, 0.25 * b, z_d + 55 * s), np.array([66, 56, 60]) * s)
        lung &= np.abs(x) > 22 * s
        tissue[lung] = LUNG
        labels[lung] = ids[f"lung_upper_lobe_{side}"]

    # abdominal organs (later ones win)
    organs = [
        ("liver", LIVER, _ellipsoid(p, (0.42 * a, 0.05 * b, z_d - 45 * s), (0.55 * a, 0.78 * b, 85 * s))),
        (None, BOWEL, _ellipsoid(p, (-0.35 * a, 0.3 * b, z_d - 45 * s), np.array([42, 38, 48]) * s)),
        ("spleen", SPLEEN, _ellipsoid(p, (-0.62 * a, -0.3 * b, z_d - 45 * s), np.array([28, 40, 48]) * s)),
        ("kidney_right", KIDNEY, _ellipsoid(p, (62 * s, y_spine + 10 * s, z_d - 110 * s), np.array([26, 24, 52]) * s)),
        ("kidney_left", KIDNEY, _ellipsoid(p, (-62 * s, y_spine + 10 * s, z_d - 100 * s), np.array([26, 24, 52]) * s)),
    ]
    for name, tis, m in organs:
        m &= abdomen
        tissue[m] = tis
        labels[m] = ids[name] if name else 0
        if name is None:  # stomach: unlabelled, with a gas cap
            gas = m & (z > z_d - 25 * s)
            tissue[gas] = AIR_IN
    tissue[aorta] = BLOOD
    labels[aorta] = ids["aorta"]

    # spine: body, arch, spinous process; levels T1..L5 with T11 near the diaphragm, labelled
    # as one thoracic and one lumbar class
    level_h = rng.uniform(24, 30) * s
    disc = 5 * s
    canal = _cylinder_z(p, (0, y_spine - 30 * s), (9 * s, 8 * s))
    bone = _cylinder_z(p, (0, y_spine), (20 * s, 16 * s))
    bone |= _cylinder_z(p, (0, y_spine - 30 * s), (15 * s, 14 * s)) & ~canal
    bone |= (np.abs(x) < 6 * s) & (y < y_spine - 40 * s) & (y > y_spine - 62 * s)
    bone &= body
    rel = (z_d - z) / level_h
    level = 10 + np.floor(rel).astype(np.int32)  # 0 = T1, 10 = T11, 12 = L1, 16 = L5
    in_disc = (rel - np.floor(rel)) * level_h > (level_h - disc)
    for i in range(17):
        m = bone & (level == i) & ~in_disc
        if not m.any():
            continue
        tissue[m] = MARROW
        tissue[m & (_edt_inside(m) <= 3.0)] = CORTICAL
        labels[m] = ids["vertebrae_T8" if i < 12 else "vertebrae_L2"]
    tissue[canal & body] = CSF
    cord = _cylinder_z(p, (0, y_spine - 30 * s), (5 * s, 5 * s)) & body
    tissue[cord] = CORD
    labels[cord] = ids["spinal_cord"]
    for sx in (-1, 1):  # paraspinal muscles (unlabelled)
        mus = _ellipsoid(p, (sx * 30 * s, y_spine - 42 * s, 0), (20 * s, 18 * s, 1e6)) & body & ~bone
        tissue[mus] = SOFT

    tissue[~body] = AIR
    labels[~body] = 0
    return tissue, labels


def make_phantom_anatomy(rng: np.random.Generator, shape: tuple[int, int, int] | None = None,
                         kind: PhantomKind = "head") -> tuple[np.ndarray, np.ndarray]:
    """Generate one phantom's geometry.

    Returns ``(tissue, labels)``: a uint8 tissue-class map (see the module's tissue
    constants) and a uint8 label map with TotalSegmentator ``total`` ids, both with
    array axes in RAS order (x right, y anterior, z superior) at :data:`SPACING_MM`.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    if shape is None:
        shape = _default_shape(rng, kind)
    shape = tuple(int(n) for n in shape)
    if kind == "head":
        return _head_anatomy(rng, shape)
    return _trunk_anatomy(rng, shape)


# ----------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth multiplicative bias field around 1."""
    from scipy.ndimage import zoom

    coarse = rng.uniform(-1, 1, size=(4, 4, 4)).astype(np.float32)
    field = zoom(coarse, [n / 4 for n in shape], order=3)[: shape[0], : shape[1], : shape[2]]
    field = np.pad(field, [(0, n - f) for n, f in zip(shape, field.shape)], mode="edge")
    return 1.0 + amplitude * field / max(1e-6, float(np.abs(field).max()))


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=float(rng.uniform(0.3, 0.9)))


def render_phantom(tissue: np.ndarray, rng: np.random.Generator, style: PhantomStyle = "ct") -> np.ndarray:
    """Turn a tissue map into an image (float32).

    * ``"ct"``: Hounsfield units, air -1000, with noise and a little blur.
    * ``"inverted_t1"``: a T1-weighted-looking rendering (dark air with Rician-like noise,
      bright fat, random scanner scale, bias field) passed through the preprint's
      inversion (:func:`pipeline.input.preprocess.invert_t1`, clip 0..3000, 1st percentile
      to 0) - like the real inverted MR input, including a partly bright background.
    * ``"random"``: every tissue gets a random value in 0..3000 (random order), the air
      stays the lowest (black); noise and bias field.
    """
    if style not in PHANTOM_STYLES:
        raise ValueError(f"style must be one of {PHANTOM_STYLES}, got {style!r}")
    lut = np.zeros(_N_TISSUES, np.float32)
    if style == "ct":
        for t, (mean, jitter) in _CT_HU.items():
            lut[t] = mean + rng.uniform(-jitter, jitter)
        img = lut[tissue]
        img = _blur(img, rng) + rng.normal(0, rng.uniform(3, 25), size=img.shape).astype(np.float32)
        return np.clip(img, -1024, 3071).astype(np.float32)
    if style == "inverted_t1":
        from pipeline.input.preprocess import invert_t1

        for t, (lo, hi) in _T1_REL.items():
            lut[t] = rng.uniform(lo, hi)
        wm = rng.uniform(250, 2600)
        img = _blur(lut[tissue], rng) * _smooth_field(rng, tissue.shape, rng.uniform(0.0, 0.3)) * wm
        sigma = rng.uniform(0.002, 0.03) * wm
        n1 = rng.normal(0, sigma, size=img.shape).astype(np.float32)
        n2 = rng.normal(0, sigma, size=img.shape).astype(np.float32)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
        if rng.random() < 0.4:  # scanners that zero the background outside the body
            from scipy.ndimage import binary_dilation

            body = binary_dilation(tissue != AIR, iterations=int(rng.integers(1, 5)))
            img[~body] = 0.0
        img = np.round(img) if rng.random() < 0.5 else img
        return invert_t1(img, background_percentile=1.0)
    # random remap
    lut[1:] = rng.uniform(150, 3000, size=_N_TISSUES - 1)
    lut[AIR] = rng.uniform(0, 60)
    img = _blur(lut[tissue], rng) * _smooth_field(rng, tissue.shape, rng.uniform(0.0, 0.25))
    img = img + rng.normal(0, rng.uniform(5, 80), size=img.shape).astype(np.float32)
    img[tissue == AIR] = np.abs(img[tissue == AIR]) * (rng.random() < 0.5)
    return np.clip(img, 0, 3000).astype(np.float32)


def make_phantom(rng: np.random.Generator, shape: tuple[int, int, int] | None = None,
                 kind: PhantomKind = "head", style: PhantomStyle = "ct") -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image, labels)``, by default CT-valued (HU).

    ``labels`` uses TotalSegmentator ``total`` class ids (uint8); arrays are in RAS axis
    order at :data:`SPACING_MM` mm isotropic spacing.
    """
    tissue, labels = make_phantom_anatomy(rng, shape, kind)
    return render_phantom(tissue, rng, style), labels


# ----------------------------------------------------------------------------------
# TotalSegmentator helpers
# ----------------------------------------------------------------------------------


def model_folder(weights_dir: Path) -> Path:
    """The folder TotalSegmentator loads for ``task="total", fast=True`` under ``weights_dir``."""
    return Path(weights_dir) / TOTAL_FAST_DATASET / TOTAL_FAST_TRAINER_DIR


def segment_with_totalseg(image: "nib.Nifti1Image", weights_dir: Path, home_dir: Path, *,
                          device: Literal["cpu", "gpu"] = "cpu", fast: bool = True) -> "nib.Nifti1Image":
    """TotalSegmentator's ``total`` task on ``image`` with the weights under ``weights_dir``.

    ``fast`` picks the 3 mm model (task 297), otherwise the full task's five part-models
    (as :func:`make_full_total_weights` writes them). The node's own call
    (:func:`pipeline.model.totalseg.run_in_child`, i.e. ``totalsegmentator()``) in a spawned
    process: the variables TotalSegmentator and nnU-Net read are set there, never in this
    process. Returns the label image on ``image``'s grid.
    """
    from pipeline.model.runner import run_model_on_nifti
    from pipeline.model.totalseg import run_in_child
    from pipeline.settings import ModelSettings

    settings = ModelSettings(kind="totalsegmentator", task="total", fast=fast, device=device,
                             weights_dir=Path(weights_dir).resolve(), home_dir=Path(home_dir).resolve())
    return run_model_on_nifti(image, run_in_child, settings, "TotalSegmentator")


def _totalseg_model_folders(weights_dir: Path, *, fast: bool,
                            task: str = "total") -> list[tuple[int, Path, dict[str, Any]]]:
    """``(task id, model folder, task config)`` of TotalSegmentator's ``task``, from its own tables."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    config = get_task_config(task, fast=fast, quiet=True)
    task_ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    trainer_dir = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config.get('model') or '3d_fullres'}"
    folders = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = Path(weights_dir) / (info.get("rel_path") or ".") / info["foldername"] / trainer_dir
        folders.append((task_id, Path(os.path.normpath(folder)), config))
    return folders


def _derived_dataset_json(fast_dataset: dict[str, Any], labels: dict[str, int], name: str,
                          description: str) -> dict[str, Any]:
    """The ``dataset.json`` of a model derived from the fast phantom: its channels and
    case count, with the derived model's labels, name and description."""
    return {
        "channel_names": fast_dataset["channel_names"],
        "labels": labels,
        "numTraining": fast_dataset["numTraining"],
        "file_ending": ".nii.gz",
        "name": name,
        "description": description,
    }


def _task_plans(fast_plans: dict[str, Any], folder: Path, config: dict[str, Any],
                patch_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The fast phantom's plans for a TotalSegmentator task's model folder: its dataset and
    plans names, and the task's spacing (and ``patch_size``, when given)."""
    resample = config["resample"]  # [x, y, z] in TotalSegmentator; nnU-Net plans are [z, y, x]
    spacing = [float(resample)] * 3 if np.isscalar(resample) else [float(v) for v in reversed(resample)]
    model = config.get("model") or "3d_fullres"
    plans = json.loads(json.dumps(fast_plans))
    plans["dataset_name"] = folder.parent.name
    plans["plans_name"] = config.get("plans") or "nnUNetPlans"
    plans["original_median_spacing_after_transp"] = spacing
    configuration = {**fast_plans["configurations"]["3d_fullres"], "spacing": spacing}
    if patch_size is not None:
        configuration["patch_size"] = list(patch_size)
    plans["configurations"] = {model: configuration}
    return plans


def make_full_total_weights(fast_weights_dir: Path, weights_dir: Path) -> list[Path]:
    """The five part-models of TotalSegmentator's full ``total`` task, derived from the fast phantom.

    **Synthetic, no training**: every part is the fast phantom checkpoint (under
    ``fast_weights_dir``) with its ``seg_layers`` rows re-sliced from the 118 ``total``
    channels into the part's label space (``class_map_5_parts``: background + the part's
    classes); a phantom class of that part keeps its learned row, every other class keeps
    the fast model's "never predicted" row (bias -100). ``plans.json`` is the fast one with
    the full task's spacing (TotalSegmentator resamples to it before nnU-Net runs) and
    larger tiles (inference only, the network is fully convolutional), and the checkpoint
    names the full task's trainer. Writes (replacing) the five model folders
    under ``weights_dir`` (a ``TOTALSEG_WEIGHTS_PATH``) and returns them in task-id order.
    """
    import torch
    from totalsegmentator.map_to_binary import class_map_5_parts, map_taskid_to_partname_ct

    [(_, fast_folder, _)] = _totalseg_model_folders(Path(fast_weights_dir), fast=True)
    fast_checkpoint = fast_folder / "fold_0" / "checkpoint_final.pth"
    if not fast_checkpoint.is_file():
        raise FileNotFoundError(f"no fast phantom model at {fast_checkpoint} (train one with `dicom-node demo-model`)")
    ckpt = torch.load(fast_checkpoint, map_location="cpu", weights_only=False)
    fast_plans = json.loads((fast_folder / "plans.json").read_text())
    fast_dataset = json.loads((fast_folder / "dataset.json").read_text())
    fast_rows = fast_dataset["labels"]  # class name -> row of the fast model's output
    learned = set(phantom_class_names())

    written = []
    for task_id, folder, config in _totalseg_model_folders(Path(weights_dir), fast=False):
        part_map = class_map_5_parts[map_taskid_to_partname_ct[task_id]]
        labels = {"background": 0, **{name: idx for idx, name in sorted(part_map.items())}}
        rows = [0] * (max(part_map) + 1)
        for name, idx in labels.items():
            rows[idx] = fast_rows[name]
        weights = dict(ckpt["network_weights"])  # the same tensors: shared ones stay shared
        for key, value in weights.items():
            if ".seg_layers." in key:
                weights[key] = value[rows].clone()

        plans = _task_plans(fast_plans, folder, config, patch_size=_FULL_PATCH_SIZE)
        in_part = [name for name in labels if name in learned]
        dataset_json = _derived_dataset_json(
            fast_dataset, labels, folder.parent.name,
            "SYNTHETIC phantom part-model (anatomically meaningless, derived from the fast "
            "phantom without training) standing in for TotalSegmentator 'total' full weights; "
            "for tests and demos only. Learned classes: " + (", ".join(in_part) or "none"),
        )
        _install_model(folder, ckpt, weights, plans, dataset_json, configuration=config.get("model") or "3d_fullres",
                       trainer=config["trainer"])
        written.append(folder)
    return written


CUSTOM_DATASET = "Dataset501_PhantomCustom"
CUSTOM_MODEL = f"{CUSTOM_DATASET}/nnUNetTrainer__nnUNetPlans__3d_fullres"
LABEL_TABLE_COLUMNS = [
    "Structure",
    *(f"{sequence}.{field}"
      for sequence in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
                       "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence",
                       "AnatomicRegionModifierSequence")
      for field in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")),
    "DicomRGBColor",
]


def make_custom_model(phantom_weights: Path, weights_dir: Path) -> str:
    """The phantom model again, as a *custom* nnU-Net model (synthetic, for tests and demos).

    Its structures are renamed ``phantom_<name>`` (so no TotalSegmentator table knows
    them) and coded by a ``labels.csv`` next to the model, one row per learned class.
    Returns the model's folder relative to ``weights_dir`` (``pipeline.model.nnunet_model``).
    """
    from pipeline.labels import segment_info

    source = model_folder(phantom_weights)
    target = Path(weights_dir) / CUSTOM_MODEL
    (target / "fold_0").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "plans.json", target / "plans.json")
    shutil.copy2(source / "fold_0" / "checkpoint_final.pth", target / "fold_0" / "checkpoint_final.pth")
    dataset = json.loads((source / "dataset.json").read_text())
    dataset["labels"] = {("background" if i == 0 else f"phantom_{n}"): i for n, i in dataset["labels"].items()}
    dataset["name"] = CUSTOM_DATASET
    (target / "dataset.json").write_text(json.dumps(dataset, indent=2))
    _write_label_table(target / "labels.csv", [(f"phantom_{name}", segment_info(name))
                                               for name in phantom_class_names()])
    return CUSTOM_MODEL


def _write_label_table(path: Path, rows: list[tuple[str, "SegmentInfo"]]) -> None:
    """A custom model's ``labels.csv`` (:data:`LABEL_TABLE_COLUMNS`): one row per ``(structure, codes)``."""
    import csv

    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_TABLE_COLUMNS)
        for structure, info in rows:
            codes = [info.category, info.property_type, info.type_modifier, info.region, info.region_modifier]
            writer.writerow([
                structure,
                *(value for code in codes for value in
                  ((code.value, code.scheme_designator, code.meaning) if code else ("", "", ""))),
                ",".join(str(v) for v in info.rgb),
            ])


def _fast_phantom(fast_weights_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The fast phantom model under ``fast_weights_dir``: its checkpoint, ``plans.json`` and ``dataset.json``."""
    import torch

    folder = model_folder(Path(fast_weights_dir))
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no fast phantom model at {checkpoint} (train one with `dicom-node demo-model`)")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return ckpt, json.loads((folder / "plans.json").read_text()), json.loads((folder / "dataset.json").read_text())


def _resliced_weights(ckpt: dict[str, Any], fast_dataset: dict[str, Any],
                      sources: list[str | None]) -> dict[str, Any]:
    """The fast phantom's network weights with new output rows: row ``i`` is the fast model's
    row of the ``total`` class ``sources[i]``, or, where that is None, a "never predicted"
    row (zero weights, bias -100). Every other tensor is the fast model's own (shared)."""
    import torch

    fast_rows = fast_dataset["labels"]  # class name -> row of the fast model's output
    weights = dict(ckpt["network_weights"])
    for key, value in weights.items():
        if ".seg_layers." not in key:
            continue
        rows = torch.zeros((len(sources),) + tuple(value.shape[1:]), dtype=value.dtype)
        if key.endswith(".bias"):
            rows.fill_(_UNUSED_CLASS_BIAS)
        for row, name in enumerate(sources):
            if name is not None:
                rows[row] = value[fast_rows[name]]
        weights[key] = rows
    return weights


KIDNEY_DATASET = "Dataset502_PhantomKidney"
KIDNEY_MODEL = f"{KIDNEY_DATASET}/nnUNetTrainer__nnUNetPlans__3d_fullres"
# kidney model label -> the fast phantom class whose learned output row it takes. Chosen
# because these fire on (inverted T1) brain MRI, NOT because they have anything to do with
# kidneys: see make_kidney_model.
KIDNEY_SOURCE_ROWS = {"kidney_right": "brain", "kidney_left": "skull", "kidney_tumor": "spinal_cord"}
KIDNEY_TUMOR_RGB = (255, 140, 0)


def make_kidney_model(phantom_weights: Path, weights_dir: Path) -> str:
    """A **synthetic, anatomically meaningless** custom nnU-Net v2 model with the labels of a
    clear-cell renal carcinoma model (1 ``kidney_right``, 2 ``kidney_left``, 3 ``kidney_tumor``).

    It stands in for the preprint's specialised kidney tumour model so that tests and demos
    can run a custom three-label model, with a lesion code, through the node's nnU-Net path.
    No training: it is the fast phantom (under ``phantom_weights``) with its output rows
    re-sliced to three classes, and the rows are **deliberately the wrong ones**: label 1
    takes the phantom's ``brain`` row, label 2 its ``skull`` row and label 3 its
    ``spinal_cord`` row (:data:`KIDNEY_SOURCE_ROWS`). The shared test data are brain MRI,
    on which the phantom's kidney rows find nothing; these three rows do fire on inverted
    T1 brain MRI, so the model labels *something* there. What it calls a kidney or a tumour
    is brain, skull or spinal cord (or nothing at all): never use it for anything but tests.

    Writes (replacing) ``weights_dir/Dataset502_PhantomKidney/nnUNetTrainer__nnUNetPlans__3d_fullres``
    (checkpoint, ``plans.json`` at the phantom's 3 mm with head-sized tiles, ``dataset.json``,
    and a ``labels.csv`` coding the kidneys as TotalSegmentator's table does and
    ``kidney_tumor`` as a neoplasm of the kidney) and returns that folder relative to
    ``weights_dir`` (``pipeline.model.nnunet_model``).
    """
    from pipeline.labels import Code, SegmentInfo, segment_info

    ckpt, fast_plans, fast_dataset = _fast_phantom(phantom_weights)
    labels = {"background": 0, "kidney_right": 1, "kidney_left": 2, "kidney_tumor": 3}
    sources = ["background", *(KIDNEY_SOURCE_ROWS[name] for name in list(labels)[1:])]
    weights = _resliced_weights(ckpt, fast_dataset, sources)
    plans = json.loads(json.dumps(fast_plans))
    plans["dataset_name"] = KIDNEY_DATASET
    plans["plans_name"] = "nnUNetPlans"
    plans["configurations"]["3d_fullres"]["patch_size"] = list(_KIDNEY_PATCH_SIZE)
    dataset_json = _derived_dataset_json(
        fast_dataset, labels, KIDNEY_DATASET,
        "SYNTHETIC phantom model (anatomically meaningless, derived from the fast phantom without "
        "training) standing in for a clear-cell renal carcinoma model; for tests and demos only. "
        "Its labels take the phantom's rows of: " +
        ", ".join(f"{name} <- {source}" for name, source in KIDNEY_SOURCE_ROWS.items()),
    )
    target = Path(weights_dir) / KIDNEY_MODEL
    _install_model(target, ckpt, weights, plans, dataset_json, configuration="3d_fullres", trainer="nnUNetTrainer")
    tumor = SegmentInfo(
        name="kidney_tumor",
        category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        property_type=Code("108369006", "SCT", "Neoplasm"),
        type_modifier=None,
        rgb=KIDNEY_TUMOR_RGB,
        region=Code("64033007", "SCT", "Kidney"),
    )
    _write_label_table(target / "labels.csv", [("kidney_right", segment_info("kidney_right")),
                                               ("kidney_left", segment_info("kidney_left")),
                                               ("kidney_tumor", tumor)])
    return KIDNEY_MODEL


# total_mr classes that total splits (or that the phantom only learned in part): the learned
# phantom row each takes. The phantom learned one vertebra label per spine region (C5, T8,
# L2) but a network output row can only come from one of them: vertebrae_C5, the only one
# of the head phantoms, i.e. the one nearest to the (brain) MRI the node is tested on.
TOTAL_MR_MERGED_ROWS = {
    "lung_left": "lung_upper_lobe_left",
    "lung_right": "lung_upper_lobe_right",
    "vertebrae": "vertebrae_C5",
}


def total_mr_source_rows() -> dict[str, str]:
    """The ``total_mr`` classes the phantom stand-in can predict -> the phantom class whose row each takes."""
    from totalsegmentator.map_to_binary import class_map

    learned = set(phantom_class_names())
    sources = {}
    for _, name in sorted(class_map["total_mr"].items()):
        source = TOTAL_MR_MERGED_ROWS.get(name, name)
        if source in learned:
            sources[name] = source
    return sources


def make_total_mr_weights(fast_weights_dir: Path, weights_dir: Path) -> list[Path]:
    """TotalSegmentator's ``total_mr`` *fast* model (task 852), derived from the fast phantom.

    **Synthetic, anatomically meaningless, no training**: the fast phantom checkpoint
    (under ``fast_weights_dir``) with its ``seg_layers`` rows re-sliced from the 118
    ``total`` channels into ``total_mr``'s 51 (background + ``class_map["total_mr"]``).
    A ``total_mr`` class the phantom learned under the same name (brain, spinal_cord,
    heart, aorta, liver, spleen, kidneys) keeps its learned row; where ``total_mr`` merges
    what ``total`` splits, it takes one learned row (:data:`TOTAL_MR_MERGED_ROWS`: each
    lung the phantom's upper lobe, ``vertebrae`` the phantom's C5); every other class is
    never predicted (bias -100). The phantom's ``skull`` has no ``total_mr`` class and is
    dropped. The network is the CT phantom's (CT normalisation, trained on CT, inverted T1
    and random intensity looks), at its 3 mm, which is also ``total_mr`` fast's spacing.

    Folder name, trainer (``nnUNetTrainer_2000epochs_NoMirroring``) and label ids come from
    TotalSegmentator's own tables. Writes (replacing) the model folder under ``weights_dir``
    (a ``TOTALSEG_WEIGHTS_PATH``) where TotalSegmentator looks for ``task="total_mr",
    fast=True`` and returns it (a list of one, like :func:`make_full_total_weights`).
    """
    from totalsegmentator.map_to_binary import class_map

    ckpt, fast_plans, fast_dataset = _fast_phantom(fast_weights_dir)
    mr_map = class_map["total_mr"]
    rows = total_mr_source_rows()
    labels = {"background": 0, **{name: idx for idx, name in sorted(mr_map.items())}}
    sources: list[str | None] = [None] * (max(mr_map) + 1)
    sources[0] = "background"
    for name, idx in labels.items():
        if name in rows:
            sources[idx] = rows[name]
    weights = _resliced_weights(ckpt, fast_dataset, sources)

    written = []
    for _, folder, config in _totalseg_model_folders(Path(weights_dir), fast=True, task="total_mr"):
        plans = _task_plans(fast_plans, folder, config)
        dataset_json = _derived_dataset_json(
            fast_dataset, labels, folder.parent.name,
            "SYNTHETIC phantom model (anatomically meaningless, derived from the fast phantom "
            "without training) standing in for TotalSegmentator 'total_mr' fast weights; for tests "
            "and demos only. Learned classes: " +
            ", ".join(name if name == source else f"{name} <- {source}" for name, source in rows.items()),
        )
        _install_model(folder, ckpt, weights, plans, dataset_json, configuration=config.get("model") or "3d_fullres",
                       trainer=config["trainer"])
        written.append(folder)
    return written


# ----------------------------------------------------------------------------------
# Training (driver in the calling process, job in a child process)
# ----------------------------------------------------------------------------------


def train_phantom_model(weights_dir: Path, *, epochs: int = DEFAULT_EPOCHS,
                        iterations_per_epoch: int = DEFAULT_ITERATIONS_PER_EPOCH, seed: int = 0,
                        work_dir: Path | None = None, num_cases: int = DEFAULT_NUM_CASES,
                        verbose: bool = False) -> Path:
    """Generate phantoms, train the tiny model and install it under ``weights_dir``.

    Writes ``plans.json``, ``dataset.json`` and ``fold_0/checkpoint_final.pth`` into
    ``weights_dir/Dataset297_.../nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres``
    (replacing what was there) and returns that folder. ``work_dir`` keeps nnU-Net's raw,
    preprocessed and results trees (and ``train.log``) for inspection; by default a
    temporary folder is used and deleted. Seeded, so reruns give similar (on CPU usually
    identical) models. The work runs in a child Python process; its output goes to
    ``train.log`` (and to stdout as well when ``verbose``).
    """
    if epochs < 1 or iterations_per_epoch < 1 or num_cases < 2:
        raise ValueError("epochs and iterations_per_epoch must be >= 1, num_cases >= 2")
    weights_dir = Path(weights_dir).resolve()
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="phantom_model_")
        work = Path(tmp.name)
    else:
        work = Path(work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        job = {"weights_dir": str(weights_dir), "work_dir": str(work), "epochs": int(epochs),
               "iterations_per_epoch": int(iterations_per_epoch), "seed": int(seed),
               "num_cases": int(num_cases)}
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job, indent=2))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["nnUNet_raw"] = str(work / "nnUNet_raw")
        env["nnUNet_preprocessed"] = str(work / "nnUNet_preprocessed")
        env["nnUNet_results"] = str(work / "nnUNet_results")
        env["nnUNet_compile"] = "false"
        env["PYTHONHASHSEED"] = str(seed)
        env.setdefault("MPLBACKEND", "Agg")
        code = "import sys; from demo.phantom_model import _training_job; _training_job(sys.argv[1])"
        log_path = work / "train.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", code, str(job_file)], env=env, cwd=str(work),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if verbose:
                        sys.stdout.write(line)
                rc = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: do not leave the training running
                    proc.kill()
                    proc.wait()
        if rc != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
            raise RuntimeError(f"phantom model training failed (exit code {rc}); log tail:\n{tail}")
        return model_folder(weights_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _write_phantom_dataset(raw_dir: Path, num_cases: int, seed: int) -> tuple[list[str], list[float]]:
    """Write the phantom cases in nnU-Net raw format with compact labels.

    Returns the class names (compact label i+1 = names[i]) and the voxel frequency of each
    compact label (background first).
    """
    import nibabel as nib

    names = phantom_class_names()
    ids = _total_ids()
    to_compact = np.zeros(256, np.uint8)
    for i, name in enumerate(names, start=1):
        to_compact[ids[name]] = i
    (raw_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    n_head = int(round(num_cases * 0.6))
    counts = np.zeros(len(names) + 1)
    for i in range(num_cases):
        kind = "head" if i < n_head else "trunk"
        j = i if kind == "head" else i - n_head
        # cycle through the styles: head cases favour the inverted-T1 look, trunk cases the CT look
        order = ["inverted_t1", "ct", "inverted_t1", "random", "inverted_t1"] if kind == "head" else \
            ["ct", "ct", "random", "ct", "inverted_t1", "ct"]
        style = order[j % len(order)]
        image, labels = make_phantom(rng, None, kind, style)
        case = f"phantom_{i:03d}"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), raw_dir / "imagesTr" / f"{case}_0000.nii.gz")
        compact = to_compact[labels]
        counts += np.bincount(compact.ravel(), minlength=len(names) + 1)
        nib.save(nib.Nifti1Image(compact, affine), raw_dir / "labelsTr" / f"{case}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: i for i, name in enumerate(names, start=1)}},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "name": TOTAL_FAST_DATASET,
        "description": "Synthetic phantoms (anatomically meaningless), for tests and demos only.",
    }
    (raw_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return names, ((counts + 1) / (counts + 1).sum()).tolist()


def _shrink_plans(plans: dict[str, Any]) -> dict[str, Any]:
    """Keep only a tiny 3d_fullres configuration (3 mm, 48^3 patch, batch 2, CT normalisation)."""
    cfg = dict(plans["configurations"]["3d_fullres"])
    n_stages = len(_FEATURES)
    cfg.update({
        "batch_size": 2,
        "patch_size": list(_PATCH_SIZE),
        "spacing": [SPACING_MM] * 3,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
    })
    cfg["architecture"] = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(_FEATURES),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n_stages,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
            # one convolution at full resolution (the expensive level on a CPU), two below
            "n_conv_per_stage": [1] + [2] * (n_stages - 1),
            "n_conv_per_stage_decoder": [1] + [2] * (n_stages - 2),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    plans = dict(plans)
    plans["configurations"] = {"3d_fullres": cfg}
    plans["dataset_name"] = TOTAL_FAST_DATASET
    plans["original_median_spacing_after_transp"] = [SPACING_MM] * 3
    return plans


def _make_trainer_class():
    import torch
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_PhantomCPU(nnUNetTrainer):
        """Short CPU training (AdamW: the default SGD needs far more iterations) without
        mirroring, periodic checkpoints or progress plots."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.initial_lr = 3e-3
            self.oversample_foreground_percent = 0.66  # small structures get seen more often
            self.num_val_iterations_per_epoch = 1
            self.save_every = 10 ** 9
            self.logger.plot_progress_png = lambda *args, **kwargs: None

        def initialize(self):
            super().initialize()
            # channels-last 3D convolutions are ~30 % faster on CPU
            self.network.to(memory_format=torch.channels_last_3d)
            priors = getattr(self, "class_priors", None)
            if priors is not None:  # start from the class frequencies instead of a uniform guess
                with torch.no_grad():
                    for layer in self.network.decoder.seg_layers:
                        layer.bias.copy_(torch.log(torch.as_tensor(priors, dtype=torch.float32)))

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr,
                                          weight_decay=self.weight_decay)
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rot, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None
            return rot, dummy_2d, initial_patch_size, None

        def plot_network_architecture(self):
            pass

        def save_checkpoint(self, filename: str) -> None:
            if os.path.basename(filename) == "checkpoint_final.pth":
                super().save_checkpoint(filename)

    return nnUNetTrainer_PhantomCPU


def _export_model(trained_dir: Path, out_dir: Path, names: list[str], plans: dict, dataset_json_raw: dict) -> None:
    """Expand the compact-label checkpoint to the 118 ``total`` channels and install it."""
    import torch

    ids = _total_ids()
    total = total_class_map()
    n_out = max(total) + 1
    ckpt = torch.load(trained_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # float16 halves the file (the predictor copies the values into its float32 network);
    # tensors shared between keys (the decoder references the encoder) stay shared
    converted: dict[int, Any] = {}
    weights = {}
    for key, value in ckpt["network_weights"].items():
        ptr = value.data_ptr()
        if ptr not in converted:
            converted[ptr] = value.contiguous().to(torch.float16) if value.is_floating_point() else value
        weights[key] = converted[ptr]
    src_rows = [0] + list(range(1, len(names) + 1))
    dst_rows = [0] + [ids[n] for n in names]
    for key in list(weights):
        if ".seg_layers." not in key:
            continue
        w = weights[key]
        new = torch.zeros((n_out,) + tuple(w.shape[1:]), dtype=w.dtype)
        if key.endswith(".bias"):
            new.fill_(_UNUSED_CLASS_BIAS)
        new[dst_rows] = w[src_rows]
        weights[key] = new
    dataset_json = {
        "channel_names": dataset_json_raw["channel_names"],
        "labels": {"background": 0, **{total[i]: i for i in sorted(total)}},
        "numTraining": dataset_json_raw["numTraining"],
        "file_ending": ".nii.gz",
        "name": TOTAL_FAST_DATASET,
        "description": "SYNTHETIC phantom model (anatomically meaningless) standing in for TotalSegmentator "
                       "'total' fast weights; for tests and demos only. Learned classes: " + ", ".join(names),
    }
    _install_model(out_dir, ckpt, weights, plans, dataset_json, configuration="3d_fullres",
                   trainer=TOTAL_FAST_TRAINER)


def _install_model(folder: Path, ckpt: dict, weights: dict, plans: dict, dataset_json: dict, *,
                   configuration: str, trainer: str) -> None:
    """Write (replacing) a model folder nnU-Net's predictor loads: a slim ``fold_0``
    checkpoint (no optimizer state) with ``weights``, ``plans.json`` and ``dataset.json``."""
    import torch

    slim = {
        "network_weights": weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": ckpt["current_epoch"],
        "init_args": {**ckpt["init_args"], "plans": plans, "dataset_json": dataset_json, "fold": 0,
                      "configuration": configuration, "device": "cpu"},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": None,
    }
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "fold_0").mkdir(parents=True)
    torch.save(slim, folder / "fold_0" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def _training_job(job_file: str) -> None:
    """Child-process entry point: phantoms -> nnU-Net plan/preprocess -> train -> export."""
    import random

    import torch

    job = json.loads(Path(job_file).read_text())
    seed = job["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()

    raw = Path(os.environ["nnUNet_raw"]) / TOTAL_FAST_DATASET
    pre = Path(os.environ["nnUNet_preprocessed"]) / TOTAL_FAST_DATASET
    res = Path(os.environ["nnUNet_results"])
    for d in (raw, pre, res / TOTAL_FAST_DATASET):
        if d.exists():
            shutil.rmtree(d)
    names, priors = _write_phantom_dataset(raw, job["num_cases"], seed)
    print(f"[phantom] wrote {job['num_cases']} phantoms in {time.time() - t0:.1f}s", flush=True)

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    n_proc = max(1, min(2, os.cpu_count() or 1))
    os.environ["nnUNet_n_proc_DA"] = str(n_proc)  # the planner uses it as a thread count
    extract_fingerprint_dataset(297, num_processes=n_proc, check_dataset_integrity=False, clean=True,
                                verbose=False)
    plan_experiment_dataset(297)
    plans_file = pre / "nnUNetPlans.json"
    plans = _shrink_plans(json.loads(plans_file.read_text()))
    plans_file.write_text(json.dumps(plans, indent=2))
    DefaultPreprocessor(verbose=False).run(297, "3d_fullres", "nnUNetPlans", num_processes=n_proc)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    # fold 0 trains on every case; two cases double as (pseudo) validation
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases, "val": cases[:1] + cases[-1:]}]))
    print(f"[phantom] nnU-Net planning + preprocessing done at {time.time() - t0:.1f}s", flush=True)

    dataset_json_raw = json.loads((raw / "dataset.json").read_text())
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process: no augmentation worker processes
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(plans, "3d_fullres", 0, dataset_json_raw, device=torch.device("cpu"))
    trainer.num_epochs = job["epochs"]
    trainer.num_iterations_per_epoch = job["iterations_per_epoch"]
    trainer.class_priors = priors
    t_train = time.time()
    trainer.run_training()
    print(f"[phantom] training ({job['epochs']} x {job['iterations_per_epoch']} iterations) took "
          f"{time.time() - t_train:.1f}s", flush=True)

    out_dir = model_folder(Path(job["weights_dir"]))
    _export_model(Path(trainer.output_folder_base), out_dir, names, plans, dataset_json_raw)
    print(f"[phantom] model written to {out_dir} (total {time.time() - t0:.1f}s)", flush=True)
