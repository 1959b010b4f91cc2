"""`dicom-node evaluate` on the phantom study, through the real model: the report files exist and hold
one row per sequence class and a column per preprocessing mode; with two ``--model`` presets (the phantom
``total`` model inverted, and the synthetic ``total_mr`` stand-in on the image as acquired), one table
with a row per sequence class and preset."""

import csv
import subprocess
import sys

import pytest

from demo.phantom_model import make_total_mr_weights
from demo.phantom_study import write_phantom_study
from dicom_node.cli import ExitStatus, main
from tests.support.paths import REPO


@pytest.mark.e2e
def test_evaluate_writes_the_table_the_csvs_and_the_chart(phantom_weights, tmp_path):
    images, references = write_phantom_study(tmp_path / "study", cases_per_kind=1, kinds=("head",))
    config = tmp_path / "config.yaml"
    config.write_text(
        "destination: {ae_title: NONE, host: 127.0.0.1, port: 104}\n"
        f"pipeline: {{model: {{weights_dir: '{phantom_weights}', home_dir: '{tmp_path / 'home'}'}}}}\n"
    )
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "evaluate", str(images), str(references), "--output", str(out),
         "--config", str(config)], capture_output=True, text=True, timeout=1200, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "evaluate" in result.stderr  # the progress bar
    table = (out / "table.md").read_text()
    assert "| Sequence | Unprocessed | Inverted | Inverted (black background) |" in table
    rows = list(csv.reader((out / "table.csv").open()))
    assert [row[0] for row in rows[1:]] == ["T1", "T2"]
    structures = list(csv.DictReader((out / "per_structure.csv").open()))
    assert {row["mode"] for row in structures} == {"none", "invert", "invert_black_background"}
    assert {row["structure"] for row in structures} >= {"brain", "skull"}
    assert all(0.0 <= float(row["dsc"]) <= 1.0 for row in structures)
    assert (out / "dsc_by_structure.png").read_bytes()[:4] == b"\x89PNG"


def _two_presets(tmp_path, ct_weights, mr_weights):
    config = tmp_path / "config.yaml"
    home = tmp_path / "home"
    config.write_text(
        "destination: {ae_title: NONE, host: 127.0.0.1, port: 104}\n"
        "models:\n"
        f"  - {{name: ct_inverted, task: total, weights_dir: '{ct_weights}', home_dir: '{home}',"
        " policy: {T1: invert_black_background, T2: skip}}\n"
        f"  - {{name: total_mr, task: total_mr, weights_dir: '{mr_weights}', home_dir: '{home}',"
        " policy: {T1: none, T2: unprocessed}}\n"
    )
    return config


@pytest.mark.e2e
def test_evaluate_puts_two_presets_in_one_table(phantom_weights, tmp_path):
    mr_weights = tmp_path / "mr_weights"
    make_total_mr_weights(phantom_weights, mr_weights)
    images, references = write_phantom_study(tmp_path / "study", cases_per_kind=1, kinds=("head",))
    config = _two_presets(tmp_path, phantom_weights, mr_weights)
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "evaluate", str(images), str(references), "--output", str(out),
         "--config", str(config), "--model", "ct_inverted", "--model", "total_mr", "--title", "CT route vs MR"],
        capture_output=True, text=True, timeout=1200, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout
    assert printed.count("| Sequence |") == 1  # one table
    header = "| Sequence | Model (preprocessing) | Mean DSC (95% CI) | Cases |"
    table = printed[printed.index(header):].split("\n\n")[0].splitlines()
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| T1", "ct_inverted (invert_black_background)"], ["| T1", "total_mr (none)"],
        ["| T2", "ct_inverted (skip)"], ["| T2", "total_mr (none)"],
    ]
    assert "| T2 | ct_inverted (skip) | not scored (policy) | 0 |" in table
    assert "- ct_inverted: T2 skipped by its policy (1 case(s): head0_T2)" in printed
    assert "- skull: not comparable" in printed  # total has a skull, total_mr has none
    assert "names mapped between total and total_mr" in printed

    rows = list(csv.reader((out / "table.csv").open()))
    assert [row[:2] for row in rows[1:]] == [
        ["T1", "ct_inverted (invert_black_background)"], ["T1", "total_mr (none)"],
        ["T2", "ct_inverted (skip)"], ["T2", "total_mr (none)"],
    ]
    assert all(row[3] == "1" for row in rows[1:] if "(skip)" not in row[1])
    structures = list(csv.DictReader((out / "per_structure.csv").open()))
    assert {(row["preset"], row["mode"]) for row in structures} == {
        ("ct_inverted", "invert_black_background"), ("total_mr", "none")}
    assert "brain" in {row["structure"] for row in structures}
    assert "skull" not in {row["structure"] for row in structures}
    assert all(0.0 <= float(row["dsc"]) <= 1.0 for row in structures)
    not_scored = list(csv.DictReader((out / "not_scored.csv").open()))
    assert {(row["case"], row["preset"], row["structure"]) for row in not_scored} >= {
        ("head0_T2", "ct_inverted", ""), ("head0_T1", "", "skull")}


def test_evaluate_names_an_unknown_preset_and_the_known_ones(tmp_path, capsys):
    config = _two_presets(tmp_path, tmp_path / "w", tmp_path / "w")
    status = main(["evaluate", str(tmp_path), str(tmp_path), "--output", str(tmp_path / "out"),
                   "--config", str(config), "--model", "total_mr", "--model", "total_mri"])
    assert status == ExitStatus.CONFIG_ERROR
    error = capsys.readouterr().err
    assert "no model preset 'total_mri'; models are: ct_inverted, total_mr" in error
    assert not (tmp_path / "out").exists()
