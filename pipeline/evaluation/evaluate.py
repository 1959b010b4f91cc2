"""Scoring segmentations against references, in the form of the preprint's Table 1.

Decisions:
* Labels are matched by structure name. A structure in the reference that the
  prediction lacks scores DSC 0 (missed, not absent); a structure absent from the
  reference is not scored.
* A case's score is the mean DSC over its reference structures; the table reports,
  per sequence class and preprocessing mode, the mean of the case scores with a 95%
  confidence interval from Student's t distribution over cases (clipped to 0..1; a
  single case has no interval and shows the mean twice).
* Two comparisons. ``evaluate_cases`` runs one model under every preprocessing mode
  (columns per mode). ``evaluate_presets`` runs several model presets, each under the
  mode its own policy gives the case's sequence class (rows per class and preset,
  labelled ``preset (mode)``); a case whose class a preset's policy skips is not
  scored for that preset, and the report says so.
* When the presets' label sets differ (TotalSegmentator ``total`` against
  ``total_mr``), names are brought to one set first (``pipeline.evaluation.label_groups``): merged
  structures are scored as one, and a reference structure that not every label set has
  is reported as not comparable instead of scoring 0.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

from pipeline.evaluation.label_groups import NameMapping

if TYPE_CHECKING:
    from pipeline.input.volume import Volume
    from pipeline.model.segment import Segmenter
    from pipeline.settings import PipelineSettings

__all__ = [
    "dice", "score_case", "mean_ci", "Score", "NotScored", "Arm", "Evaluation", "summary_table", "preset_table",
    "write_reports", "write_preset_reports", "load_reference", "evaluate_cases", "evaluate_presets",
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
    preset: str = ""  # the model preset; "" when one model's modes are compared


@dataclass(frozen=True)
class NotScored:
    """What was left out, and why: a whole case for a preset (``structure`` ""), or a
    reference structure for every preset (``preset`` "")."""

    case: str
    sequence_class: str
    preset: str
    structure: str
    reason: str


@dataclass(frozen=True)
class Evaluation:
    scores: list[Score]
    not_scored: list[NotScored]


def score_case(
    case: str,
    sequence_class: str,
    mode: str,
    reference: np.ndarray,
    reference_names: Mapping[int, str],
    prediction: np.ndarray,
    prediction_names: Mapping[int, str],
    *,
    preset: str = "",
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
        scores.append(Score(case, sequence_class, mode, name, dice(truth, predicted), preset))
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


def _case_means(scores: Iterable[Score]) -> dict[tuple[str, str, str], list[float]]:
    """Case scores grouped by (sequence class, preset, mode)."""
    per_case: dict[tuple[str, str, str, str], list[float]] = {}
    for s in scores:
        per_case.setdefault((s.sequence_class, s.preset, s.mode, s.case), []).append(s.dsc)
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for (cls, preset, mode, _), values in sorted(per_case.items()):
        grouped.setdefault((cls, preset, mode), []).append(float(np.mean(values)))
    return grouped


MODE_TITLES = {"none": "Unprocessed", "invert": "Inverted", "invert_black_background": "Inverted (black background)"}
SKIPPED = "skip"  # the mode shown for a preset whose policy skips a class


def _cell(values: Sequence[float]) -> str:
    mean, low, high = mean_ci(values)
    return "n/a" if not values else f"{mean:.2f} ({low:.2f}, {high:.2f})"


def _preset_label(preset: str, mode: str) -> str:
    return f"{preset} ({mode})"


def summary_table(scores: Sequence[Score], modes: Sequence[str]) -> list[list[str]]:
    """Rows of Table 1 for one model: a header, then one row per sequence class."""
    grouped = _case_means(scores)
    classes = sorted({cls for cls, _, _ in grouped})
    rows = [["Sequence", *[MODE_TITLES.get(m, m) for m in modes]]]
    for cls in classes:
        rows.append([cls, *[_cell(grouped.get((cls, "", mode), [])) for mode in modes]])
    return rows


def _policy_skips(not_scored: Iterable[NotScored]) -> dict[tuple[str, str], list[str]]:
    """Cases left out by a preset's policy, by (sequence class, preset)."""
    skipped: dict[tuple[str, str], list[str]] = {}
    for note in not_scored:
        if note.preset and not note.structure:
            skipped.setdefault((note.sequence_class, note.preset), []).append(note.case)
    return skipped


def preset_table(scores: Sequence[Score], not_scored: Sequence[NotScored], presets: Sequence[str]) -> list[list[str]]:
    """Rows of Table 1 for several presets: a header, then per sequence class one row per
    preset and mode (``preset (mode)``); a class the preset's policy skips shows
    ``preset (skip)`` and is not scored."""
    grouped = _case_means(scores)
    skipped = _policy_skips(not_scored)
    classes = sorted({cls for cls, _, _ in grouped} | {cls for cls, _ in skipped})
    rows = [["Sequence", "Model (preprocessing)", "Mean DSC (95% CI)", "Cases"]]
    for cls in classes:
        for preset in presets:
            for (c, p, mode), values in grouped.items():
                if (c, p) == (cls, preset):
                    rows.append([cls, _preset_label(preset, mode), _cell(values), str(len(values))])
            if (cls, preset) in skipped:
                rows.append([cls, _preset_label(preset, SKIPPED), "not scored (policy)", "0"])
    return rows


def _markdown(title: str, rows: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    lines += ["", "Mean DSC over cases (each case: mean over its reference structures), 95% CI (t)."]
    if notes:
        lines += ["", "Not scored:", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def _write_tables(scores: Sequence[Score], rows: Sequence[Sequence[str]], notes: Sequence[str], output: Path,
                  title: str) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": output / "table.md",
        "csv": output / "table.csv",
        "structures": output / "per_structure.csv",
        "chart": output / "dsc_by_structure.png",
    }
    paths["markdown"].write_text(_markdown(title, rows, notes))
    with paths["csv"].open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with paths["structures"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "sequence_class", "preset", "mode", "structure", "dsc"])
        writer.writerows([s.case, s.sequence_class, s.preset, s.mode, s.structure, f"{s.dsc:.4f}"] for s in scores)
    return paths


def write_reports(scores: Sequence[Score], modes: Sequence[str], output: Path, title: str) -> dict[str, Path]:
    """One model's modes: table as Markdown and CSV, per-structure CSV, and a bar chart
    PNG (Figure 2a style)."""
    paths = _write_tables(scores, summary_table(scores, modes), [], output, title)
    _bar_chart(scores, [MODE_TITLES.get(m, m) for m in modes], lambda s: MODE_TITLES.get(s.mode, s.mode),
               paths["chart"], title)
    return paths


def _notes(evaluation: Evaluation, names: NameMapping | None) -> list[str]:
    notes = []
    for (cls, preset), cases in sorted(_policy_skips(evaluation.not_scored).items()):
        notes.append(f"{preset}: {cls} skipped by its policy ({len(cases)} case(s): {', '.join(sorted(cases))})")
    structures: dict[str, set[str]] = {}
    for note in evaluation.not_scored:
        if note.structure:
            structures.setdefault(note.structure, set()).add(note.case)
    for structure, cases in sorted(structures.items()):
        sets = f" ({', '.join(names.tasks)})" if names else ""
        notes.append(f"{structure}: not comparable, not in every compared label set{sets} ({len(cases)} case(s))")
    if names is not None:
        merged = sorted({merged for merged in names.renames.values()})
        notes.append(f"names mapped between {' and '.join(names.tasks)}: parts scored merged as {', '.join(merged)}"
                     " (pipeline/evaluation/label_groups.py)")
    return notes


def write_preset_reports(evaluation: Evaluation, presets: Sequence[str], output: Path, title: str,
                         names: NameMapping | None = None) -> dict[str, Path]:
    """Several presets side by side: the files of ``write_reports``, plus
    ``not_scored.csv`` (cases a policy skips, structures not comparable)."""
    rows = preset_table(evaluation.scores, evaluation.not_scored, presets)
    paths = _write_tables(evaluation.scores, rows, _notes(evaluation, names), output, title)
    paths["not_scored"] = output / "not_scored.csv"
    with paths["not_scored"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "sequence_class", "preset", "structure", "reason"])
        writer.writerows([n.case, n.sequence_class, n.preset, n.structure, n.reason] for n in evaluation.not_scored)
    series = [row[1] for row in rows[1:] if not row[1].endswith(f"({SKIPPED})")]
    _bar_chart(evaluation.scores, list(dict.fromkeys(series)), lambda s: _preset_label(s.preset, s.mode),
               paths["chart"], title)
    return paths


def _bar_chart(scores: Sequence[Score], series: Sequence[str], label_of: Callable[[Score], str], path: Path,
               title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({s.sequence_class for s in scores}) or ["(none)"]
    structures = sorted({s.structure for s in scores})
    figure, axes = plt.subplots(len(classes), 1, figsize=(max(6, 1.2 * len(structures) + 2), 3.2 * len(classes)),
                                squeeze=False)
    width = 0.8 / max(len(series), 1)
    for axis, cls in zip(axes[:, 0], classes):
        for i, label in enumerate(series):
            means = [
                np.mean([s.dsc for s in scores
                         if (s.sequence_class, label_of(s), s.structure) == (cls, label, name)] or [0])
                for name in structures
            ]
            axis.bar(np.arange(len(structures)) + i * width, means, width, label=label)
        axis.set_xticks(np.arange(len(structures)) + width * (len(series) - 1) / 2, structures, rotation=30,
                        ha="right")
        axis.set_ylim(0, 1)
        axis.set_ylabel("mean DSC")
        axis.set_title(f"{title}: {cls}")
        if series:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- running models and modes over a set of cases ------------------------------------

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

    from pipeline.input.nifti import nifti_to_array

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


@dataclass(frozen=True)
class Arm:
    """One model in a comparison: its warm segmenter, its pipeline settings, the preset
    name for the report, and a fixed preprocessing ``mode`` (None: the mode its policy
    gives each case's sequence class)."""

    segmenter: "Segmenter"
    settings: "PipelineSettings"
    preset: str = ""
    mode: str | None = None


def evaluate_cases(images: Path, references: Path, settings, segmenter, modes: Sequence[str]) -> list[Score]:
    """Segment every case (a subfolder of ``images``) under every mode and score it.

    The sequence class comes from the classifier; the policy is not applied, since the
    point is to compare the modes.
    """
    arms = [Arm(segmenter, settings, mode=mode) for mode in modes]
    return _evaluate(images, references, arms, None).scores


def evaluate_presets(images: Path, references: Path, arms: Sequence[Arm], names: NameMapping | None = None
                     ) -> Evaluation:
    """Segment every case with every preset, each under its own policy, and score it;
    ``names`` (``pipeline.evaluation.label_groups.mapping_for``) when the presets' label sets differ."""
    return _evaluate(images, references, arms, names)


def _evaluate(images: Path, references: Path, arms: Sequence[Arm], names: NameMapping | None) -> Evaluation:
    from tqdm import tqdm

    from pipeline.input.preprocess import preprocess
    from pipeline.input.series import assemble_series
    from pipeline.input.volume import read_volume
    from pipeline.process import preprocessing_for, read_series

    cases = sorted(p for p in images.iterdir() if p.is_dir())
    if not cases:
        raise FileNotFoundError(f"no case folders in {images}")
    if not arms:
        raise ValueError("nothing to evaluate: no model or mode given")
    settings = arms[0].settings  # reading and classifying are the same for every preset
    options = settings.preprocessing
    scores: list[Score] = []
    not_scored: list[NotScored] = []
    with tqdm(total=len(cases) * len(arms), desc="evaluate", unit="run") as progress:
        for case_dir in cases:
            case = case_dir.name
            read = read_series(sorted(p for p in case_dir.rglob("*") if p.is_file()), settings)
            cls = read.classification.sequence_class.value
            planned: list[tuple[Arm, str]] = []
            for arm in arms:
                mode = arm.mode
                if mode is None:
                    chosen, why = preprocessing_for(arm.settings, read.classification)
                    if chosen is None:
                        not_scored.append(NotScored(case, cls, arm.preset, "", why))
                        progress.update(1)
                        continue
                    mode = chosen.value
                planned.append((arm, mode))
            if not planned:
                continue
            volume = read_volume(assemble_series(read.headers, min_slices=settings.min_slices,
                                                 four_d=settings.four_d))
            reference, reference_names = load_reference(_find_reference(references, case), volume)
            if names is not None:
                reference, reference_names = names.merge(reference, reference_names)
                for label, name in sorted(reference_names.items()):
                    if not names.is_comparable(name) and (reference == label).any():
                        not_scored.append(NotScored(case, cls, "", name, "not in every compared label set ("
                                                    + ", ".join(names.tasks) + ")"))
                reference_names = {k: v for k, v in reference_names.items() if names.is_comparable(v)}
            prepared: dict[str, Volume] = {}  # one preprocessing per mode, shared by the presets
            for arm, mode in planned:
                progress.set_postfix_str(f"{case} {arm.preset or mode}")
                if mode not in prepared:
                    prepared[mode] = volume.with_array(
                        preprocess(volume.array, mode, clip_min=options.clip_min, clip_max=options.clip_max,
                                   background_percentile=options.background_percentile)
                    )
                label_map = arm.segmenter.segment(prepared[mode])
                predicted, predicted_names = label_map.array, label_map.names
                if names is not None:
                    predicted, predicted_names = names.merge(predicted, predicted_names)
                scores += score_case(case, cls, mode, reference, reference_names, predicted, predicted_names,
                                     preset=arm.preset)
                progress.update(1)
    return Evaluation(scores, not_scored)
