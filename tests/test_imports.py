"""The house rules of the imports: no circle, layers one way, a light config.

The contracts live in pyproject.toml ([tool.importlinter]) and are checked by
import-linter on grimp's import graph, which counts the imports inside functions too,
so a circle hidden in a function breaks them as well.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dicom_node", "pipeline")


def product_modules() -> list[str]:
    """Every module of the product packages, by its dotted name."""
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    for contract in ("no import circle", "pipeline never imports dicom_node", "no writer imports another writer",
                     "the config loads no writer"):
        assert f"{contract}" in result.stdout and "KEPT" in result.stdout


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter: an order that only works because another
    module was imported first (a circle broken by luck) fails here."""
    def load(module: str) -> tuple[str, str | None]:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        return module, None if result.returncode == 0 else result.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = {module: error for module, error in pool.map(load, product_modules()) if error}
    assert not failures, failures


@pytest.mark.parametrize("module", ["dicom_node.config", "dicom_node.cli.jobs"])
def test_the_config_and_status_load_no_writer(module: str):
    """``dicom-node status`` and every config check stay light: no highdicom, Pillow or
    scikit-image (the writers' libraries), no pydicom, no torch."""
    heavy = ("highdicom", "PIL", "skimage", "pydicom", "torch")
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} loads {result.stdout.strip()}"
