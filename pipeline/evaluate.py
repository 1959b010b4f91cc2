"""Scoring segmentations against references, in the form of the preprint's Table 1.

Decisions:
* Labels are matched by structure name. A structure in the reference that the
  prediction lacks scores DSC 0 (missed, not absent); a structure absent from the
  reference is not scored.
* A case's score is the mean DSC over its reference structures; the table reports,
  per sequence class and preprocessing mode, the mean of the case scores with a 95%
  confidence interval from Student's t distribution over cases (clipped to 0..1; a
  single case has no interval and shows the mean twice).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "dice", "score_case", "mean_ci", "Score", "summary_table", "write_reports",
    "load_reference", "evaluate_cases",
]


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (1.0 when both are empty)."""
    reference = reference.astype(bool, copy=False)
    prediction = prediction.astype(bool, copy=False)
    total = int(reference.sum()) + int(prediction.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(reference, prediction).sum()) / total


@dataclass(frozen=True)
class Score:
    case: str
    sequence_class: str
    mode: str
    structure: str
    dsc: float


def score_case(
    case: str,
    sequence_class: str,
    mode: str,
    reference: np.ndarray,
    reference_names: Mapping[int, str],
    prediction: np.ndarray,
    prediction_names: Mapping[int, str],
) -> list[Score]:
    """DSC per reference structure, matched by name."""
    if reference.shape != prediction.shape:
        raise ValueError(f"{case}: reference {reference.shape} and prediction {prediction.shape} differ in shape")
    by_name = {name: label for label, name in prediction_names.items()}
    scores = []
    for label, name in sorted(reference_names.items()):
        truth = reference == label
        if not truth.any():
            continue
        predicted = prediction == by_name[name] if name in by_name else np.zeros_like(truth)
        scores.append(Score(case, sequence_class, mode, name, dice(truth, predicted)))
    return scores


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its t-distribution confidence interval, clipped to 0..1."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + confidence) / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _case_means(scores: Iterable[Score]) -> dict[tuple[str, str], list[float]]:
    per_case: dict[tuple[str, str, str], list[float]] = {}
    for s in scores:
        per_case.setdefault((s.sequence_class, s.mode, s.case), []).append(s.dsc)
    grouped: dict[tuple[str, str], list[float]] = {}
    for (cls, mode, _), values in sorted(per_case.items()):
        grouped.setdefault((cls, mode), []).append(float(np.mean(values)))
    return grouped


MODE_TITLES = {"none": "Unprocessed", "invert": "Inverted", "invert_black_background": "Inverted (black background)"}


def summary_table(scores: Sequence[Score], modes: Sequence[str]) -> list[list[str]]:
    """Rows of Table 1: a header, then one row per sequence class."""
    grouped = _case_means(scores)
    classes = sorted({cls for cls, _ in grouped})
    rows = [["Sequence", *[MODE_TITLES.get(m, m) for m in modes]]]
    for cls in classes:
        row = [cls]
        for mode in modes:
            values = grouped.get((cls, mode), [])
            mean, low, high = mean_ci(values)
            row.append("n/a" if not values else f"{mean:.2f} ({low:.2f}, {high:.2f})")
        rows.append(row)
    return rows


def write_reports(scores: Sequence[Score], modes: Sequence[str], output: Path, title: str) -> dict[str, Path]:
    """Table as Markdown and CSV, per-structure CSV, and a bar chart PNG (Figure 2a style)."""
    output.mkdir(parents=True, exist_ok=True)
    rows = summary_table(scores, modes)
    paths = {
        "markdown": output / "table.md",
        "csv": output / "table.csv",
        "structures": output / "per_structure.csv",
        "chart": output / "dsc_by_structure.png",
    }
    lines = [f"**{title}**", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    lines += ["", "Mean DSC over cases (each case: mean over its reference structures), 95% CI (t)."]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with paths["structures"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "sequence_class", "mode", "structure", "dsc"])
        writer.writerows([s.case, s.sequence_class, s.mode, s.structure, f"{s.dsc:.4f}"] for s in scores)
    _bar_chart(scores, modes, paths["chart"], title)
    return paths


def _bar_chart(scores: Sequence[Score], modes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({s.sequence_class for s in scores})
    structures = sorted({s.structure for s in scores})
    figure, axes = plt.subplots(len(classes), 1, figsize=(max(6, 1.2 * len(structures) + 2), 3.2 * len(classes)),
                                squeeze=False)
    width = 0.8 / max(len(modes), 1)
    for axis, cls in zip(axes[:, 0], classes):
        for i, mode in enumerate(modes):
            means = [
                np.mean([s.dsc for s in scores if (s.sequence_class, s.mode, s.structure) == (cls, mode, name)] or [0])
                for name in structures
            ]
            axis.bar(np.arange(len(structures)) + i * width, means, width, label=MODE_TITLES.get(mode, mode))
        axis.set_xticks(np.arange(len(structures)) + width * (len(modes) - 1) / 2, structures, rotation=30, ha="right")
        axis.set_ylim(0, 1)
        axis.set_ylabel("mean DSC")
        axis.set_title(f"{title}: {cls}")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- running the pipeline's modes over a set of cases --------------------------------

def load_reference(path: Path, volume) -> tuple[np.ndarray, dict[int, str]]:
    """A reference label map on the volume's grid, from a DICOM SEG or a NIfTI with a label table.

    A NIfTI ``case.nii.gz`` needs ``case.json`` beside it: ``{"1": "liver", ...}``.
    """
    if path.suffix == ".dcm":
        import highdicom as hd

        seg = hd.seg.segread(path)
        uids = [s.sop_instance_uid for s in volume.series.slices]
        array = seg.get_pixels_by_source_instance(
            uids, combine_segments=True, relabel=False, assert_missing_frames_are_empty=True
        )
        names = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
        return np.asarray(array, dtype=np.uint16), names
    import json

    import nibabel as nib

    from pipeline.segment import nifti_to_array

    table = path.with_name(path.name.split(".")[0] + ".json")
    if not table.is_file():
        raise FileNotFoundError(f"label table {table} is missing for {path}")
    names = {int(k): str(v) for k, v in json.loads(table.read_text()).items()}
    return nifti_to_array(nib.load(path), volume), names


def _find_reference(references: Path, case: str) -> Path:
    for candidate in (references / f"{case}.dcm", references / f"{case}.nii.gz", references / f"{case}.nii"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no reference for case {case} in {references} (.dcm, .nii.gz or .nii)")


def evaluate_cases(images: Path, references: Path, settings, segmenter, modes: Sequence[str]) -> list[Score]:
    """Segment every case (a subfolder of ``images``) under every mode and score it.

    The sequence class comes from the classifier; the policy is not applied, since the
    point is to compare the modes.
    """
    from tqdm import tqdm

    from pipeline.classify import classify_series
    from pipeline.preprocess import preprocess
    from pipeline.run import image_headers
    from pipeline.series import assemble_series, read_headers
    from pipeline.volume import read_volume

    cases = sorted(p for p in images.iterdir() if p.is_dir())
    if not cases:
        raise FileNotFoundError(f"no case folders in {images}")
    scores: list[Score] = []
    options = settings.preprocessing
    with tqdm(total=len(cases) * len(modes), desc="evaluate", unit="run") as progress:
        for case_dir in cases:
            paths = sorted(p for p in case_dir.rglob("*") if p.is_file())
            headers = read_headers(paths)
            classification = classify_series(image_headers(headers))
            volume = read_volume(assemble_series(headers, min_slices=settings.min_slices, four_d=settings.four_d))
            reference, reference_names = load_reference(_find_reference(references, case_dir.name), volume)
            for mode in modes:
                progress.set_postfix_str(f"{case_dir.name} {mode}")
                prepared = volume.with_array(
                    preprocess(volume.array, mode, clip_min=options.clip_min, clip_max=options.clip_max,
                               background_percentile=options.background_percentile)
                )
                label_map = segmenter.segment(prepared)
                scores += score_case(case_dir.name, classification.sequence_class.value, mode, reference,
                                     reference_names, label_map.array, label_map.names)
                progress.update(1)
    return scores
