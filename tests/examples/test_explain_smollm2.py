"""qcompile.api.explain on the real SmolLM2-135M with the default recipe's pipeline (w4a4), short
calibration, weights rounded to nearest instead of by GPTQ and rotations learned in a few steps
instead of 120 (tests/helpers/recipes.py): GPTQ over 211 linears and the learning each take
minutes on 2 cores whatever the number of calibration tokens, and explain reports any pipeline
the same way (the tiny-model tests run GPTQ; `qcompile explain` runs the default recipe as it is).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from qcompile.api.explain import explain
from qcompile.core.pipeline import parse_pipeline
from qcompile.core.recipes import RECIPES
from qcompile.tools import zoo
from tests.helpers.recipes import quick

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPECTED = [f"model.layers.{i}.{name}" for i in range(30) for name in LAYER_LINEARS] + ["lm_head"]


@pytest.mark.model
def test_explain_smollm2_default_recipe(smollm2):
    model, tokenizer = smollm2
    windows = zoo.token_windows(tokenizer, "emma", 128, 64)  # 2 x 64 tokens
    calibration = [{"input_ids": ids, "use_cache": False} for ids in windows]
    pipeline = quick("w4a4").replace("weights=gptq", "weights=rtn")
    report = explain(model, calibration[0], calibration=calibration, pipeline=pipeline, progress=False)
    print(report)

    assert report.pipeline == pipeline and "search-clip=true" in pipeline
    assert [p.spec for p in report.passes] == [str(s) for s in parse_pipeline(report.pipeline)]
    rows = report.linears
    assert len(rows) == 211 and [r.module for r in rows] == EXPECTED  # 30 layers x 7 + lm_head
    assert all(r.sqnr_db is not None and math.isfinite(r.sqnr_db) for r in rows)
    assert all(r.outliers_before is not None and r.outliers_after is not None for r in rows)
    head = report.linear("lm_head")
    assert head.runs_as == "W4A8 fused g32"  # weight steps in groups of 32
    body = [r for r in rows if r.module != "lm_head"]
    assert {r.runs_as for r in body} == {"W4A4 fused g32"}
    assert {r.migration for r in body} == {"migrated"}
    median = statistics.median(r.sqnr_db for r in body)
    assert 5 < median < 40  # measured 18.8 dB with GPTQ
    assert head.sqnr_db > median  # 8-bit activations: measured 31.2 dB with GPTQ
    # migration and rotation flatten the inputs: down_proj's outlier channels (up to ~100-200x the
    # median channel before) are within a few x after
    down = [r for r in body if r.module.endswith("down_proj")]
    assert max(r.outliers_before for r in down) > 50
    assert max(r.outliers_after for r in down) < 20
    assert statistics.median(r.outliers_after for r in body) < statistics.median(r.outliers_before for r in body)


@pytest.mark.model
def test_cli_round_to_nearest_with_json(tmp_path, capsys):
    path = tmp_path / "explain.json"
    from qcompile.__main__ import main as qcompile_command  # `qcompile explain ...`, in this process

    qcompile_command(["explain", "--recipe", "w4a4-rtn", "--tokens", "64", "--window", "64", "--json", str(path)])
    out = capsys.readouterr().out
    assert "insert-quantizers{w-bits=4,a-bits=4}" in out and "summary: 211 linears" in out
    assert "lm_head" in out and "matches skip='lm_head'" in out
    data = json.loads(path.read_text())
    assert data["pipeline"] == RECIPES["w4a4-rtn"]
    linears = data["graphs"][0]["linears"]
    assert [r["module"] for r in linears] == EXPECTED
    assert linears[-1]["runs_as"] == "float" and linears[-1]["sqnr_db"] is None
    assert all(isinstance(r["sqnr_db"], float) for r in linears[:-1])
