"""SmolLM2-135M: quantize with the default recipe, save, load in NEW processes: the loaded
model's logits equal the quantized model's bit for bit, and the loading process calibrates
nothing. This is `qcompile bench artifact` on a short input (the benchmark behind the
"load < 25% of quantize time" figure), run as a user runs it; every process starts with an
empty Inductor cache of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_artifact_loads_in_a_new_process_bit_exactly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "bench", "artifact", "--calibration-tokens", "128",
         "--prompt-tokens", "24", "--no-compiling-load", "--dir", str(tmp_path / "artifact")],
        capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.startswith("SmolLM2-135M w4a4, calibration 128 tokens")
    loads = [line for line in out.splitlines() if line.startswith("load, new process")]
    assert [line.split(",")[2].split("  ")[0].strip() for line in loads] == ["with the artifact's compiled kernels"]
    for line in loads:
        cells = line.split()
        assert cells[-2:] == ["yes", "none"], line  # logits bit-exact; no calibration
    assert (tmp_path / "artifact" / "q4.safetensors").is_file()
