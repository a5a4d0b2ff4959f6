"""The accuracy table on the real models, short: it must show migration, rotation and GPTQ working.

The bounds sit between measurements of this exact command (1024 tokens, 4 calibration batches):
FP32 19.34; w4a4-rtn 9.75e5, MiniLM cosine 0.341; w4a4 33.65 (1.74x FP32), cosine 0.929.
Broken once each, locally, with Q4_DISABLE: without migrate-scales w4a4 gave 66.9 (3.46x FP32),
failing the 2.5x bound; without rotate-inputs 1.32e4 (684x) and cosine 0.487, failing both.

The command runs once per session (`eval_table` in tests/conftest.py: `qcompile eval` with the
arguments above, recipes w4a4-rtn and w4a4); tests/test_cli.py reads the same table.
"""

from __future__ import annotations

import pytest

MAX_W4A4_RATIO = 2.5  # measured 1.74; 3.46 without migration
MIN_MINILM_COSINE = 0.85  # measured 0.929; 0.487 without rotation


@pytest.mark.model
def test_eval_table_shows_the_w4a4_recipe_working(eval_table):
    proc = eval_table
    assert proc.returncode == 0, proc.stderr[-4000:]
    values = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in ("SmolLM2-135M", "all-MiniLM-L6-v2"):
            values[(parts[0], parts[1])] = float(parts[5] if parts[2] == "cosine" else parts[3])
    fp32, rtn, qsm = (values[("SmolLM2-135M", r)] for r in ("FP32", "w4a4-rtn", "w4a4"))
    assert 10 < fp32 < 60
    assert qsm * 1000 < rtn, (qsm, rtn)
    assert qsm < MAX_W4A4_RATIO * fp32, (qsm, fp32)
    cos_rtn, cos_qsm = (values[("all-MiniLM-L6-v2", r)] for r in ("w4a4-rtn", "w4a4"))
    assert 0 < cos_rtn < cos_qsm <= 1
    assert cos_qsm >= MIN_MINILM_COSINE, cos_qsm
