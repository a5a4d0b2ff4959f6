"""The accuracy table on the real models, short: it must show migration, rotation and GPTQ
working, the learned rotations beating the fixed ones, and LLM-FP4's codes beating integer ones.

The bounds sit between measurements of this exact command (1024 tokens, 4 calibration batches):
FP32 19.34; w4a4 with the fixed rotation (now w4a4-hadamard) 33.65 (1.74x FP32), cosine 0.929.
Broken once each, locally, with Q4_DISABLE: without migrate-scales it gave 66.9 (3.46x FP32),
failing the 2.5x bound; without rotate-inputs 1.32e4 (684x) and cosine 0.487, failing both.
LLM-FP4's recipe, fp4 (on 1 thread, at 3e43c4f): 29.66 (1.53x FP32 19.34) against the fixed
rotation's 32.27 (1.67x); MiniLM cosine 0.9315 against 0.9283.

The command runs once per session (`eval_table` in tests/conftest.py: `qcompile eval` with the
arguments above, recipes w4a4-hadamard, w4a4 and fp4); tests/test_cli.py reads the same table.
"""

from __future__ import annotations

import pytest

MAX_W4A4_RATIO = 2.5  # measured 1.74; 3.46 without migration
MIN_MINILM_COSINE = 0.85  # measured 0.929; 0.487 without rotation
MAX_FP4_RATIO = 2.0  # issue 14's bound; measured 1.53


def table(stdout: str) -> dict[tuple[str, str], float]:
    """{(model, recipe): perplexity or cosine} of the printed table."""
    values = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in ("SmolLM2-135M", "all-MiniLM-L6-v2"):
            values[(parts[0], parts[1])] = float(parts[5] if parts[2] == "cosine" else parts[3])
    return values


@pytest.mark.model
def test_eval_table_shows_the_w4a4_recipe_working(eval_table):
    proc = eval_table
    assert proc.returncode == 0, proc.stderr[-4000:]
    values = table(proc.stdout)
    fp32, hadamard, learned = (values[("SmolLM2-135M", r)] for r in ("FP32", "w4a4-hadamard", "w4a4"))
    assert 10 < fp32 < 60
    assert hadamard < MAX_W4A4_RATIO * fp32, (hadamard, fp32)
    # the default's learned rotations beat the fixed ones they start from
    assert learned < hadamard, (learned, hadamard)
    for recipe in ("w4a4-hadamard", "w4a4"):
        assert values[("all-MiniLM-L6-v2", recipe)] >= MIN_MINILM_COSINE, recipe


@pytest.mark.model
def test_eval_table_shows_the_fp4_recipe_below_the_integer_one(eval_table):
    """LLM-FP4's 4-bit floats with the same passes as w4a4 but its learning (w4a4-hadamard):
    lower perplexity than the integer codes, within 2x FP32, and MiniLM's embeddings as close."""
    proc = eval_table
    assert proc.returncode == 0, proc.stderr[-4000:]
    values = table(proc.stdout)
    fp32, hadamard, fp4 = (values[("SmolLM2-135M", r)] for r in ("FP32", "w4a4-hadamard", "fp4"))
    assert fp4 < hadamard, (fp4, hadamard)
    assert fp4 < MAX_FP4_RATIO * fp32, (fp4, fp32)
    assert values[("all-MiniLM-L6-v2", "fp4")] >= MIN_MINILM_COSINE
