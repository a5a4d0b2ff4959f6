"""qcompile.explain on the real SmolLM2-135M with the default recipe (w4a4), short calibration.

The time is the recipe's (GPTQ and the clipping search of 211 linears, which do not shrink with
fewer calibration tokens), not the 2 x 64 tokens.
"""

from __future__ import annotations

import json
import math
import statistics

from qcompile import zoo
from qcompile.explain import explain, main
from qcompile.pipeline import parse_pipeline
from qcompile.recipes import RECIPES

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPECTED = [f"model.layers.{i}.{name}" for i in range(30) for name in LAYER_LINEARS] + ["lm_head"]


def test_explain_smollm2_default_recipe():
    model, tokenizer = zoo.load_smollm2()
    windows = zoo.token_windows(tokenizer, "emma", 128, 64)  # 2 x 64 tokens
    calibration = [{"input_ids": ids, "use_cache": False} for ids in windows]
    report = explain(model, calibration[0], calibration=calibration, progress=False)
    print(report)

    assert report.pipeline == RECIPES["w4a4"]
    assert [p.spec for p in report.passes] == [str(s) for s in parse_pipeline(report.pipeline)]
    rows = report.linears
    assert len(rows) == 211 and [r.module for r in rows] == EXPECTED  # 30 layers x 7 + lm_head
    assert all(r.sqnr_db is not None and math.isfinite(r.sqnr_db) for r in rows)
    assert all(r.outliers_before is not None and r.outliers_after is not None for r in rows)
    head = report.linear("lm_head")
    assert head.runs_as == "W4A8 fused"
    body = [r for r in rows if r.module != "lm_head"]
    assert {r.runs_as for r in body} == {"W4A4 fused"}
    assert {r.migration for r in body} == {"migrated"}
    median = statistics.median(r.sqnr_db for r in body)
    assert 5 < median < 40  # measured 18.8 dB
    assert head.sqnr_db > median  # 8-bit activations: measured 31.2 dB
    # migration and rotation flatten the inputs: down_proj's outlier channels (up to ~100-200x the
    # median channel before) are within a few x after
    down = [r for r in body if r.module.endswith("down_proj")]
    assert max(r.outliers_before for r in down) > 50
    assert max(r.outliers_after for r in down) < 20
    assert statistics.median(r.outliers_after for r in body) < statistics.median(r.outliers_before for r in body)


def test_cli_round_to_nearest_with_json(tmp_path, capsys):
    path = tmp_path / "explain.json"
    report = main(["--recipe", "w4a4-rtn", "--tokens", "64", "--window", "64", "--json", str(path)])
    out = capsys.readouterr().out
    assert "insert-quantizers{w-bits=4,a-bits=4}" in out and "summary: 211 linears" in out
    assert "lm_head" in out and "matches skip='lm_head'" in out
    data = json.loads(path.read_text())
    assert data["pipeline"] == RECIPES["w4a4-rtn"] == report.pipeline
    linears = data["graphs"][0]["linears"]
    assert [r["module"] for r in linears] == EXPECTED
    assert linears[-1]["runs_as"] == "float" and linears[-1]["sqnr_db"] is None
    assert all(isinstance(r["sqnr_db"], float) for r in linears[:-1])
