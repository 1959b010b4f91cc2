import csv

import numpy as np
import pytest

from pipeline.evaluate import Score, dice, mean_ci, score_case, summary_table, write_reports


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
