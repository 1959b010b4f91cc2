"""`dicom-node evaluate` on the phantom study, through the real model: the report files exist and hold
one row per sequence class and a column per preprocessing mode."""

import csv
import subprocess
import sys

from demo.phantom_study import write_phantom_study
from tests.peers import REPO


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
