"""Run the synthetic phantom model through TotalSegmentator's Python API on real T1 series.

Usage::

    .venv/bin/python bench/check_phantom_model.py [WEIGHTS_DIR] [SERIES_DIR ...]

Reads each DICOM series with SimpleITK, applies the preprint's inversion
(``invert_black_background``), hands TotalSegmentator a nibabel image with a RAS affine
(task ``total``, ``fast=True``, CPU, in a spawned process: this one's environment is
left alone) and prints the labels found with their voxel counts
and the inference time. Exit code 1 if any series gives an empty label map.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo.phantom_model import segment_with_totalseg  # noqa: E402
from pipeline.input.preprocess import preprocess  # noqa: E402

DEFAULT_WEIGHTS = ROOT / "models" / "phantom_total_fast"
DEFAULT_SERIES = [
    Path("/work/shared/data/mri/t1_siemens_3t_fl2d_sag_hfs"),
    Path("/work/shared/data/mri/t1_philips_3t_mprage_sag"),
]


def read_series(folder: Path) -> sitk.Image:
    """Read the (first) DICOM series in ``folder``."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise FileNotFoundError(f"no DICOM series in {folder}")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def sitk_to_nifti(image: sitk.Image, voxels: np.ndarray) -> nib.Nifti1Image:
    """``voxels`` (SimpleITK z, y, x order) on ``image``'s grid as a nibabel image (RAS affine)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing  # columns: direction of i, j, k times spacing (LPS)
    affine[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
    return nib.Nifti1Image(np.ascontiguousarray(voxels.transpose(2, 1, 0)), affine)


def main(argv: list[str]) -> int:
    weights = Path(argv[0]) if argv else DEFAULT_WEIGHTS
    series = [Path(a) for a in argv[1:]] or DEFAULT_SERIES
    home = Path(tempfile.mkdtemp(prefix="totalseg_home_"))
    from totalsegmentator.map_to_binary import class_map

    names = class_map["total"]
    ok = True
    for folder in series:
        image = read_series(folder)
        voxels = preprocess(sitk.GetArrayFromImage(image), "invert_black_background")
        nifti = sitk_to_nifti(image, voxels)
        t0 = time.time()
        seg = segment_with_totalseg(nifti, weights, home)
        dt = time.time() - t0
        data = np.asarray(seg.dataobj)
        ids, counts = np.unique(data[data > 0], return_counts=True)
        found = {names[int(i)]: int(c) for i, c in zip(ids, counts)}
        print(f"{folder.name}: shape {data.shape} (input {nifti.shape}), {dt:.1f}s, labels {found}")
        ok &= bool(found) and data.shape == nifti.shape
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
