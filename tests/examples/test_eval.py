"""The accuracy table on the real models, short: it must show migration, rotation, GPTQ, the
first token's own step and grouped weight steps working, and on MiniLM the learned rotations
beating the fixed ones and LLM-FP4's codes beating integer ones.

The bounds sit between measurements of this exact command (1024 tokens, 4 calibration batches,
512 MiniLM calibration sentences). At 38b69b5 (weights stepped in groups of 32): FP32 19.34,
w4a4-hadamard 24.61 (1.27x), w4a4 25.36 (1.31x), fp4 25.51 (1.32x); MiniLM 0.9518, 0.9606,
0.9605. On two SmolLM2 windows the three are within noise of each other (on the 64k-token table
in the README w4a4 37.13 and fp4 36.93 beat w4a4-hadamard's 37.51), so the orderings are
MiniLM's here. At 0954f0d (a step per weight row, 64 MiniLM sentences): 1.31x, 1.36x, 1.31x;
MiniLM 0.9447, 0.9553, 0.9509. Before the first token's step (1.74x for the fixed rotation),
broken once each with Q4_DISABLE: without migrate-scales 3.46x, without rotate-inputs 684x and
cosine 0.487.

At 1f35901, lowered eagerly as the test runs it (`Q4_LOWER=eager qcompile eval
--tokens 1024 --calibration-batches 4 --sentences 20 --recipes w4a4-hadamard,w4a4,fp4`): FP32 19.34,
w4a4-hadamard 26.02 (1.35x), w4a4 25.53 (1.32x), fp4 24.61 (1.27x); MiniLM 0.9536, 0.9612, 0.9617.

The command runs once for the module (`eval_table`: `qcompile eval` with the arguments above,
recipes w4a4-hadamard, w4a4 and fp4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAX_W4A4_RATIO = 1.5  # measured 1.27 (fixed rotation) and 1.31 (learned); 1.74 before the first token's step
MIN_MINILM_COSINE = 0.93  # measured 0.9518 and 0.9606; 0.487 without rotation
MAX_FP4_RATIO = 2.0  # issue 14's bound; measured 1.32


@pytest.fixture(scope="module")
def eval_table() -> subprocess.CompletedProcess:
    """`qcompile eval` on both real models, short (1024 tokens of Pride and Prejudice, 4 batches
    of Emma, 20 sentences), FP32, w4a4-hadamard, w4a4 and fp4, run once as a user runs it: this
    module's tests read its table. Lowered eagerly (`Q4_LOWER=eager`: the same graphs and ops, run op by op): Inductor's
    compiles of every graph took most of its 1257 s in CI; 390 s eagerly on 2 idle cores."""
    return subprocess.run(
        [sys.executable, "-m", "qcompile", "eval", "--tokens", "1024", "--calibration-batches", "4",
         "--sentences", "20", "--recipes", "w4a4-hadamard,w4a4,fp4"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, env={**os.environ, "Q4_LOWER": "eager"})


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
    assert learned < MAX_W4A4_RATIO * fp32, (learned, fp32)
    for recipe in ("w4a4-hadamard", "w4a4"):
        assert values[("all-MiniLM-L6-v2", recipe)] >= MIN_MINILM_COSINE, recipe
    # the default's learned rotations beat the fixed ones they start from (on two SmolLM2 windows
    # the two are within noise of each other: see the module docstring)
    assert values[("all-MiniLM-L6-v2", "w4a4")] > values[("all-MiniLM-L6-v2", "w4a4-hadamard")]


@pytest.mark.model
def test_eval_table_shows_the_fp4_recipe_below_the_integer_one(eval_table):
    """LLM-FP4's 4-bit floats with the same passes as w4a4 but its learning (w4a4-hadamard):
    within 2x FP32 on SmolLM2, and MiniLM's embeddings closer than the integer codes' (on two
    SmolLM2 windows the two are within noise: see the module docstring)."""
    proc = eval_table
    assert proc.returncode == 0, proc.stderr[-4000:]
    values = table(proc.stdout)
    fp32, fp4 = (values[("SmolLM2-135M", r)] for r in ("FP32", "fp4"))
    assert fp4 < MAX_FP4_RATIO * fp32, (fp4, fp32)
    minilm_fp4, minilm_hadamard = (values[("all-MiniLM-L6-v2", r)] for r in ("fp4", "w4a4-hadamard"))
    assert minilm_fp4 >= MIN_MINILM_COSINE and minilm_fp4 > minilm_hadamard, (minilm_fp4, minilm_hadamard)


@pytest.mark.model
def test_the_eval_command_runs_as_users_run_it(eval_table):
    assert eval_table.args[1:4] == ["-m", "qcompile", "eval"]
    assert eval_table.returncode == 0, eval_table.stderr[-4000:]
    out = eval_table.stdout
    assert "SmolLM2-135M" in out and "all-MiniLM-L6-v2" in out and "w4a4-hadamard" in out
