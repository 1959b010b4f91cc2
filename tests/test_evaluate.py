import csv

import numpy as np
import pytest
from totalsegmentator.map_to_binary import class_map

from pipeline.evaluation.evaluate import (
    Evaluation,
    NotScored,
    Score,
    dice,
    mean_ci,
    preset_table,
    score_case,
    summary_table,
    write_preset_reports,
    write_reports,
)
from pipeline.evaluation.label_groups import MERGED, mapping_between, mapping_for
from pipeline.settings import ModelSettings


def test_dice_on_hand_made_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 voxels
    b[:2, :1] = True  # 2 voxels, both inside a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0


def test_mean_ci_known_answer():
    mean, low, high = mean_ci([0.2, 0.4, 0.6])  # sd 0.2, se 0.11547, t(0.975, 2) = 4.3027
    assert mean == pytest.approx(0.4)
    assert low == pytest.approx(0.0)  # 0.4 - 0.4968 clipped
    assert high == pytest.approx(0.8968, abs=1e-3)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    mean, low, high = mean_ci([0.5, 0.6, 0.5, 0.6])
    assert (low, high) == (pytest.approx(0.4581, abs=1e-3), pytest.approx(0.6419, abs=1e-3))


def test_labels_are_matched_by_name_and_a_missing_structure_scores_zero():
    reference = np.array([1, 1, 2, 2, 0, 3])
    prediction = np.array([7, 7, 0, 0, 0, 0])  # liver under another id; kidney missing
    scores = score_case("c", "T1", "invert", reference, {1: "liver", 2: "kidney_left", 3: "spleen", 4: "aorta"},
                        prediction, {7: "liver", 9: "spleen"})
    assert {s.structure: s.dsc for s in scores} == {"liver": 1.0, "kidney_left": 0.0, "spleen": 0.0}


def test_table_layout(tmp_path):
    scores = [
        Score("a", "T1", "none", "liver", 0.0), Score("a", "T1", "invert", "liver", 0.5),
        Score("b", "T1", "none", "liver", 0.2), Score("b", "T1", "invert", "liver", 0.7),
        Score("a", "T2", "none", "liver", 0.3),
    ]
    rows = summary_table(scores, ["none", "invert"])
    assert rows[0] == ["Sequence", "Unprocessed", "Inverted"]
    assert [r[0] for r in rows[1:]] == ["T1", "T2"]
    assert rows[1][1].startswith("0.10 (") and rows[1][2].startswith("0.60 (")
    assert rows[2] == ["T2", "0.30 (0.30, 0.30)", "n/a"]
    paths = write_reports(scores, ["none", "invert"], tmp_path, "test")
    assert "| T1 | 0.10 (" in paths["markdown"].read_text()
    assert list(csv.reader(paths["csv"].open()))[0] == rows[0]
    assert len(list(csv.reader(paths["structures"].open()))) == 6
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


# -- several presets, and the names shared by total and total_mr ---------------------

def test_the_merge_table_matches_totalsegmentators_label_sets():
    total, total_mr = set(class_map["total"].values()), set(class_map["total_mr"].values())
    for merged, parts in MERGED.items():
        assert merged in total_mr and merged not in total
        assert set(parts) <= total and not set(parts) & total_mr
    assert len(MERGED["vertebrae"]) == len([n for n in total if n.startswith("vertebrae_")])
    assert set(MERGED["lung_left"]) | set(MERGED["lung_right"]) == {n for n in total if n.startswith("lung_")}


def test_mapping_only_when_the_label_sets_differ():
    assert mapping_between(["total", "total"]) is None
    assert mapping_for([ModelSettings(task="total"), ModelSettings(task="total", fast=False)]) is None
    assert mapping_for([ModelSettings(task="total"), ModelSettings(kind="nnunet", nnunet_model="D/x")]) is None
    names = mapping_for([ModelSettings(task="total"), ModelSettings(task="total_mr")])
    assert names.tasks == ("total", "total_mr")
    assert names.name("vertebrae_L3") == "vertebrae" and names.name("lung_middle_lobe_right") == "lung_right"
    assert names.name("liver") == "liver"
    for comparable in ("vertebrae_C5", "vertebrae", "lung_upper_lobe_left", "lung_left", "brain", "liver"):
        assert names.is_comparable(comparable), comparable
    for only_one in ("skull", "rib_left_3", "trachea", "kidney_cyst_left", "intervertebral_discs", "tumor"):
        assert not names.is_comparable(only_one), only_one


def test_merge_joins_the_parts_under_one_label():
    names = mapping_between(["total", "total_mr"])
    labels = np.array([[0, 3, 4], [5, 9, 4]], np.uint8)  # 9 has no name: kept
    merged, merged_names = names.merge(labels, {3: "lung_upper_lobe_left", 4: "lung_lower_lobe_left", 5: "liver"})
    assert merged_names == {3: "lung_left", 5: "liver"}
    assert merged.tolist() == [[0, 3, 3], [5, 9, 3]] and merged.dtype == np.uint8
    same, same_names = names.merge(labels, {1: "lung_left", 5: "liver"})
    assert same is labels and same_names == {1: "lung_left", 5: "liver"}


def test_merged_reference_and_prediction_score_as_one_structure():
    names = mapping_between(["total", "total_mr"])
    reference = np.array([1, 2, 2, 0, 0, 3])  # total names: two vertebrae and the skull
    prediction = np.array([7, 7, 7, 0, 0, 0])  # total_mr: one vertebrae
    ref, ref_names = names.merge(reference, {1: "vertebrae_L1", 2: "vertebrae_L2", 3: "skull"})
    pred, pred_names = names.merge(prediction, {7: "vertebrae"})
    comparable = {k: v for k, v in ref_names.items() if names.is_comparable(v)}
    scores = score_case("c", "T1", "none", ref, comparable, pred, pred_names, preset="total_mr")
    assert [(s.structure, s.dsc, s.preset) for s in scores] == [("vertebrae", 1.0, "total_mr")]


def test_preset_table_has_a_row_per_class_and_preset_and_says_what_was_skipped(tmp_path):
    scores = [
        Score("a", "T1", "invert_black_background", "liver", 0.5, "ct"), Score("a", "T1", "none", "liver", 0.7, "mr"),
        Score("b", "T1", "invert_black_background", "liver", 0.7, "ct"), Score("b", "T1", "none", "liver", 0.9, "mr"),
        Score("c", "T2", "none", "liver", 0.4, "mr"),
    ]
    not_scored = [NotScored("c", "T2", "ct", "", "T2 series, not segmented by policy: ..."),
                  NotScored("a", "T1", "", "skull", "not in every compared label set (total, total_mr)")]
    rows = preset_table(scores, not_scored, ["ct", "mr"])
    assert rows[0] == ["Sequence", "Model (preprocessing)", "Mean DSC (95% CI)", "Cases"]
    assert [r[:2] for r in rows[1:]] == [["T1", "ct (invert_black_background)"], ["T1", "mr (none)"],
                                         ["T2", "ct (skip)"], ["T2", "mr (none)"]]
    assert rows[1][2].startswith("0.60 (") and rows[1][3] == "2"
    assert rows[3][2:] == ["not scored (policy)", "0"]
    assert rows[4][2:] == ["0.40 (0.40, 0.40)", "1"]
    paths = write_preset_reports(Evaluation(scores, not_scored), ["ct", "mr"], tmp_path, "two",
                                 mapping_between(["total", "total_mr"]))
    markdown = paths["markdown"].read_text()
    assert "| T1 | mr (none) | 0.80 (" in markdown
    assert "- ct: T2 skipped by its policy (1 case(s): c)" in markdown
    assert "- skull: not comparable" in markdown and "names mapped between total and total_mr" in markdown
    assert list(csv.reader(paths["csv"].open())) == rows
    assert len(list(csv.reader(paths["not_scored"].open()))) == 3
    assert {r["preset"] for r in csv.DictReader(paths["structures"].open())} == {"ct", "mr"}
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"
