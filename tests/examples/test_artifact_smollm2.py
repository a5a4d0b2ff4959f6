"""SmolLM2-135M: quantize with the default recipe, save, load in a NEW process: the loaded
model's logits equal the quantized model's bit for bit, and the loading process calibrates
nothing. This is `qcompile bench artifact` on a short input (the benchmark behind the
"load < 25% of quantize time" figure), run as a user runs it; Inductor's caches are off in both
processes, so the loading one compiles everything itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_artifact_loads_in_a_new_process_bit_exactly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "bench", "artifact", "--calibration-tokens", "128",
         "--prompt-tokens", "24", "--dir", str(tmp_path / "artifact")],
        capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "SmolLM2-135M w4a4" in out and "load in a new process" in out
    assert "logits of the loaded model bit-exact: yes" in out
    assert "calibration in the loading process: none" in out
    assert (tmp_path / "artifact" / "q4.safetensors").is_file()
