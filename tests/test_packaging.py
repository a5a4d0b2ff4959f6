"""`pip install .` (not editable) gives qcompile.* and nothing at the top level but qcompile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_from_outside_the_repo(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    top_level = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    # one package, nothing else at the top level; bin/ holds the `qcompile` console script
    assert top_level == {"qcompile", "bin"}, top_level
    assert (target / "bin" / "qcompile").exists()
    assert (target / "qcompile" / "tools" / "data" / "emma.txt").exists()
    check = (
        "import sys, importlib.metadata as md, qcompile, qcompile.passes, qcompile.kernels, qcompile.backends.q4\n"
        f"assert qcompile.__file__.startswith({str(target)!r}), qcompile.__file__\n"
        "eps = [e for e in md.entry_points(group='torch_dynamo_backends') if e.name == 'q4']\n"
        "assert eps and eps[0].value == 'qcompile.backends.q4:q4_backend', eps\n"
        "from qcompile.core.pass_api import registry\n"
        "assert {'insert-quantizers', 'fuse-kernels'} <= set(registry())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # run from an empty folder so the repository's own folders cannot be imported by accident
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
