"""The layering contract of pyproject.toml ([tool.importlinter]), checked by scripts/check_layers.py:
it holds for the repository, and it fails, naming the import, when one module imports upward."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = [sys.executable, str(ROOT / "scripts" / "check_layers.py")]


def test_the_layering_contract_holds():
    proc = subprocess.run(CHECK, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert ", 0 broken." in proc.stdout, proc.stdout[-4000:]


def test_one_wrong_way_import_breaks_the_contract(tmp_path):
    """A copy of the repository where core's IR module imports the backend (a layer above)."""
    shutil.copytree(ROOT / "qcompile", tmp_path / "qcompile", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ir = tmp_path / "qcompile" / "core" / "ir.py"
    ir.write_text("import qcompile.backends  # noqa: F401  (the wrong way: core -> backends)\n" + ir.read_text())

    proc = subprocess.run([*CHECK, "--repo", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "qcompile.core is not allowed to import qcompile.backends" in proc.stdout, proc.stdout[-4000:]
    assert "qcompile.core.ir -> qcompile.backends (l.1)" in proc.stdout, proc.stdout[-4000:]
