"""A phantom study of the preprint's effect: T1- and T2-weighted MR renderings of the
synthetic anatomy the phantom model learned from, written as DICOM series with NIfTI
reference label maps, ready for ``dicom-node evaluate``.

This demonstrates the method and the evaluation; it is not evidence. The anatomy and
the model are synthetic, and the model saw inverted-T1-like renderings in training.
The real test needs real weights and real abdominal T1 data.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from demo.phantom_model import (
    _T1_REL,
    AIR,
    AIR_IN,
    BLOOD,
    BOWEL,
    CORD,
    CORTICAL,
    CSF,
    EYE,
    FAT,
    GM,
    KIDNEY,
    LIVER,
    LUNG,
    MARROW,
    SOFT,
    SPACING_MM,
    SPLEEN,
    WM,
    make_phantom_anatomy,
    total_class_map,
)

__all__ = ["render_mr", "write_phantom_study"]

# T2-weighted MR, relative to white matter: fluid bright, fat fairly bright, bone dark.
_T2_REL = {
    AIR: (0.0, 0.0), FAT: (1.2, 1.6), SOFT: (0.7, 0.9), CORTICAL: (0.01, 0.08), MARROW: (1.0, 1.4),
    CSF: (2.6, 3.2), GM: (1.3, 1.5), WM: (0.95, 1.05), EYE: (2.4, 3.0), AIR_IN: (0.0, 0.04),
    LUNG: (0.02, 0.1), LIVER: (0.5, 0.7), SPLEEN: (1.1, 1.4), KIDNEY: (1.2, 1.6), BLOOD: (0.05, 1.5),
    BOWEL: (0.8, 1.6), CORD: (1.0, 1.2),
}
_TIMING = {"T1": (500.0, 12.0), "T2": (4000.0, 100.0)}  # TR, TE (ms): a spin echo the classifier knows


def render_mr(tissue: np.ndarray, rng: np.random.Generator, weighting: str) -> np.ndarray:
    """A T1- or T2-weighted rendering: unsigned values, exact 0 outside the body, noise."""
    table = _T1_REL if weighting == "T1" else _T2_REL
    lut = np.array([rng.uniform(*table[t]) for t in range(len(table))], np.float32)
    scale = rng.uniform(400, 1200)
    image = lut[tissue] * scale
    image += np.abs(rng.normal(0, 0.02 * scale, size=image.shape)).astype(np.float32)
    image[tissue == AIR] = 0.0  # scanners that store the background as 0
    return np.clip(np.round(image), 0, 4095).astype(np.uint16)


def _write_series(ras: np.ndarray, folder: Path, weighting: str, case: str) -> list[Path]:
    """Axial DICOM slices of a RAS-ordered array; slice k, row r, column c = ras[-c, -r, k]."""
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = ras.shape
    study, series, frame = (generate_uid(entropy_srcs=[case, kind]) for kind in ("study", "series", "frame"))
    tr, te = _TIMING[weighting]
    paths = []
    for k in range(nz):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[case, str(k)])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.PatientName, ds.PatientID = "PHANTOM^" + case, "PHANTOM-" + case
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.SeriesDescription = f"phantom {weighting}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = tr, te, 90
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        # LPS: x grows to the patient's left (RAS -x), y to posterior (RAS -y), z superior.
        ds.ImagePositionPatient = [0.0, 0.0, k * SPACING_MM]
        ds.PixelSpacing = [SPACING_MM, SPACING_MM]
        ds.SliceThickness = SPACING_MM
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(ras[::-1, ::-1, k].T).astype(np.uint16).tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom_study(
    output: Path, cases_per_kind: int = 2, seed: int = 1234, kinds: tuple[str, ...] = ("head", "trunk")
) -> tuple[Path, Path]:
    """Write ``images/<case>/`` DICOM series and ``references/<case>.nii.gz`` + ``.json``.

    Each phantom is rendered once as T1 and once as T2 (the same anatomy, so the two
    sequence classes are comparable). Returns (images, references).
    """
    from pipeline.input.nifti import volume_to_nifti
    from pipeline.input.series import load_series
    from pipeline.input.volume import read_volume

    rng = np.random.default_rng(seed)
    images, references = output / "images", output / "references"
    references.mkdir(parents=True, exist_ok=True)
    names = total_class_map()
    for kind in kinds:
        for index in range(cases_per_kind):
            tissue, labels = make_phantom_anatomy(rng, kind=kind)
            present = {int(v): names[int(v)] for v in np.unique(labels) if v}
            for weighting in ("T1", "T2"):
                case = f"{kind}{index}_{weighting}"
                paths = _write_series(render_mr(tissue, rng, weighting), images / case, weighting, case)
                volume = read_volume(load_series(paths))
                reference = np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 1, 0))  # slice, row, column
                grid = volume_to_nifti(volume)
                nib.save(nib.Nifti1Image(reference.transpose(2, 1, 0).astype(np.uint8), grid.affine),
                         references / f"{case}.nii.gz")
                (references / f"{case}.json").write_text(json.dumps({str(k): v for k, v in present.items()}))
    return images, references
