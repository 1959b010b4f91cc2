"""Our LPS ``Volume`` as the RAS NIfTI image the models take, and their labels back.

nibabel's affine maps voxel indices to RAS millimetres; SimpleITK's geometry is LPS.
Voxel (i, j, k) of the NIfTI image is ``array[k, j, i]`` of the volume, so the two
share one grid and a label image can be checked against it before it is trusted.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.errors import SegmentationError
from pipeline.input.volume import Volume

__all__ = ["volume_to_nifti", "nifti_to_array"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ras_affine(image: sitk.Image) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def volume_to_nifti(volume: Volume) -> nib.Nifti1Image:
    """The volume as a NIfTI image with a RAS affine; voxel (i, j, k) = array[k, j, i]."""
    # one straight copy of the image's buffer: the transposed view is already Fortran-ordered,
    # as a NIfTI file's voxels are (and as the model runner sends them, without another copy)
    data = np.array(sitk.GetArrayViewFromImage(volume.image).transpose(2, 1, 0), order="F")
    return nib.Nifti1Image(data, _ras_affine(volume.image))


def nifti_to_array(label_image: nib.Nifti1Image, volume: Volume) -> np.ndarray:
    """A label NIfTI on the volume's grid back to (slice, row, column) order."""
    if not np.allclose(label_image.affine, _ras_affine(volume.image), atol=1e-3):
        raise SegmentationError("the model returned a label image on another grid than its input")
    data = np.asanyarray(label_image.dataobj)
    if not np.issubdtype(data.dtype, np.integer):  # labels as floats: rounded first
        data = np.rint(data)
    return np.ascontiguousarray(data.astype(np.uint16, copy=False).transpose(2, 1, 0))
