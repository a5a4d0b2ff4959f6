"""The `qcompile` command line: every subcommand runs; user passes appear in `qcompile passes`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qcompile.core.pass_api import registry
from qcompile.core.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def qcompile(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qcompile", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_passes_lists_every_registered_pass_with_its_options():
    out = qcompile("passes").stdout
    own = {name: cls for name, cls in registry().items() if cls.__module__.startswith("qcompile.")}
    assert len(own) >= 6  # (other tests register passes of their own in this process)
    for name, cls in own.items():
        assert f"{name}  ({cls.__module__})" in out and cls.summary in out
    assert "only         str" in out  # insert-quantizers' options table


def test_passes_lists_a_pass_registered_outside_the_package(tmp_path):
    (tmp_path / "my_passes.py").write_text(textwrap.dedent('''
        from qcompile.core.pass_api import PassResult, QPass, register_pass

        @register_pass
        class CountLinears(QPass):
            name = "count-linears"
            summary = "Count the linears (a pass written outside qcompile)."
            statistics = ("linears",)

            def call(self, gm):
                return PassResult(gm, False)
    '''))
    out = qcompile("passes", "--import", "my_passes", env={"PYTHONPATH": str(tmp_path)}).stdout
    assert "count-linears  (my_passes)" in out and "statistics: linears" in out


def test_passes_names_a_module_it_cannot_import():
    proc = qcompile("passes", "--import", "no_such_module_here", check=False)
    assert proc.returncode == 2 and "no_such_module_here" in proc.stderr


def test_recipes_lists_every_recipe_and_marks_the_default():
    out = qcompile("recipes").stdout
    assert all(name in out for name in RECIPES) and "w4a4 (default)" in out


@pytest.mark.slow
def test_bench_and_eval_take_their_own_arguments():
    out = qcompile("bench", "kernels", "--shapes", "64x32", "--m", "1", "--repeats", "1").stdout
    assert "q4 W4A4 (CPU) speedup" in out
    assert "--calibration-batches" in qcompile("eval", "--help").stdout


def test_the_installed_script_runs():
    script = Path(sys.executable).parent / "qcompile"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "passes" in proc.stdout


@pytest.mark.slow
def test_custom_pass_example_runs_and_its_pass_is_listed():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_pass.py")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # its graph before and after (the backend's print instruments), and its statistic
    before = proc.stderr.split("IR Dump After remove-eval-dropout")[0]
    after = proc.stderr.split("IR Dump After remove-eval-dropout")[1].split("IR Dump")[0]
    assert "IR Dump Before remove-eval-dropout" in before and "aten.dropout" in before
    assert "aten.dropout" not in after
    assert "dropouts-removed" in proc.stderr and "cosine(q4 output, FP32 output)" in proc.stdout
    listed = qcompile("passes", "--import", "examples/custom_pass.py").stdout
    assert "remove-eval-dropout  (custom_pass)" in listed


@pytest.mark.model
def test_quantize_saves_an_artifact(tmp_path):
    from qcompile.frontend import saved_artifact

    out = qcompile("quantize", "--recipe", "w4a4-rtn", "--calibration-tokens", "64", "--window", "64",
                   "--lower", "eager", "--out", str(tmp_path / "smollm2")).stdout
    assert "recipe" in out and "w4a4-rtn" in out and "64 tokens of Emma in 1 batches" in out
    assert "load it: qcompile.load(model," in out
    saved = saved_artifact.read(tmp_path / "smollm2")
    assert saved.manifest["recipe"] == "w4a4-rtn" and "model.layers.29.mlp.down_proj.weight" in saved.manifest["stats"]


@pytest.mark.slow
def test_quantize_rejects_bad_input(tmp_path):
    proc = qcompile("quantize", "--out", str(tmp_path), "--recipe", "w3a3", check=False)
    assert proc.returncode == 2 and "invalid choice: 'w3a3'" in proc.stderr
    proc = qcompile("quantize", "--out", str(tmp_path), "--model", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode != 0 and "no model folder" in proc.stderr


@pytest.mark.slow
def test_every_subcommand_has_help():
    for command in ("quantize", "explain", "passes", "recipes", "eval", "bench"):
        proc = qcompile(command, "--help")
        assert proc.stdout.startswith("usage: qcompile"), (command, proc.stdout[:200])
