"""The architecture matrix (`qcompile zoo-matrix`): twelve architectures x fp32/fp16/bf16 x every
recipe, each cell checked as the command checks it (`qcompile.tools.zoo_matrix`): rounding off is
exact to the model, the fused kernels match their fake-quant reference, linears are quantized or
say why not.

The whole product is 396 cells (`qcompile zoo-matrix`, its summary is in the README and every
cell in docs/zoo-matrix.md: 396 passed; 2-15 s a cell on one core). CI covers it in two parts: every family in every dtype with the default
recipe (36 cells), and every other recipe in every dtype on a family that turns with the pair
(30 cells: each recipe meets three families, each family two or three recipes).
"""

from __future__ import annotations

import pytest

from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES
from qcompile.tools import zoo_matrix
from qcompile.tools.explain import main as explain_main
from qcompile.tools.tiny_models import FAMILIES

DTYPES = list(zoo_matrix.DTYPES)
DEFAULT_CELLS = [(f, d, DEFAULT_RECIPE) for f in FAMILIES for d in DTYPES]
_OTHERS = [r for r in RECIPES if r != DEFAULT_RECIPE]
TURNING_CELLS = [(list(FAMILIES)[(j * len(DTYPES) + k) % len(FAMILIES)], d, r)
                 for j, r in enumerate(_OTHERS) for k, d in enumerate(DTYPES)]


def _check(cell: zoo_matrix.Cell) -> None:
    assert not cell.problems(), cell
    assert cell.quantized > 0
    # a linear in float always says why (the report's reasons are the float linears' own)
    assert sum(cell.reasons.values()) == cell.in_float


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,recipe", DEFAULT_CELLS)
def test_every_family_in_every_dtype_with_the_default_recipe(family, dtype, recipe):
    _check(zoo_matrix.run_cell(family, dtype, recipe))


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,recipe", TURNING_CELLS)
def test_every_recipe_in_every_dtype(family, dtype, recipe):
    _check(zoo_matrix.run_cell(family, dtype, recipe))


def test_what_each_architecture_leaves_in_float_and_why():
    """The linears an architecture keeps in float are named with their reason: Mixtral's router
    (it picks the experts), whose experts' grouped GEMMs run quantized (q4.grouped_linear_w4a4,
    counted with the linears); the rest quantize every linear but the head w4a4-rtn skips."""
    cell = zoo_matrix.run_cell("mixtral", "float32", "w4a4-rtn")
    assert not cell.problems(), cell
    assert cell.reasons == {
        "a mixture-of-experts router: its output picks the experts (top-k), which rounding would change": 2,
        "its module path matches skip='lm_head'": 1,
    }
    assert cell.quantized == 8 + 4  # q/k/v/o of 2 layers, and 2 layers' gate_up and down expert GEMMs
    gpt2 = zoo_matrix.run_cell("gpt2", "float32", "w4a4-rtn")  # Conv1D's transposed weights
    assert (gpt2.quantized, gpt2.reasons) == (8, {"its module path matches skip='lm_head'": 1})


def test_the_command_prints_the_table_and_fails_on_a_failing_cell(capsys, monkeypatch):
    assert zoo_matrix.main(["--families", "gpt2", "--dtypes", "bfloat16", "--recipes", "w4a4-rtn"]) == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "1 of 1 cells pass" in out
    monkeypatch.setattr(zoo_matrix, "EXACT_HALF_FACTOR", 0.0)  # a bound no graph meets
    monkeypatch.setattr(zoo_matrix, "EXACT_FP32", 0.0)
    assert zoo_matrix.main(["--families", "gpt2", "--dtypes", "bfloat16", "--recipes", "w4a4-rtn"]) == 1
    assert "FAIL: rounding off" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        zoo_matrix.main(["--families", "gpt5"])
    assert "unknown families: gpt5" in capsys.readouterr().err


def test_explain_names_the_linears_an_architecture_keeps_in_float(capsys):
    report = explain_main(["--model", "tiny-mixtral", "--recipe", "w4a4-rtn", "--tokens", "32", "--window", "16"])
    floats = {(r.module, r.float_reason) for r in report.linears if not r.quantized}
    assert ("model.layers.1.mlp.gate", "a mixture-of-experts router: its output picks the experts (top-k), "
            "which rounding would change") in floats
    experts = {r.module: r.runs_as for r in report.linears if ".mlp.experts." in r.module}
    assert experts == {f"model.layers.{i}.mlp.experts.{w}": "W4A4 experts fused"
                       for i in (0, 1) for w in ("gate_up_proj", "down_proj")}
    assert "12 quantized, 3 float" in capsys.readouterr().out
