"""`qcompile generate`: quantizes SmolLM2, prints the continuation and its speed; bad input is an error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def generate(*args: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcompile", "generate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.model
def test_generate_prints_the_text_and_its_speed():
    """Lowered eagerly (`Q4_LOWER=eager`, the same graphs run op by op): the command's output is
    what is checked, and Inductor's compiles of the prompt and decode graphs took most of the
    test's 243 s in a one-thread test worker; generation through Inductor is test_generate_smollm2.py's."""
    prompt = "It is a truth universally acknowledged"
    proc = generate("--prompt", prompt, "--recipe", "w4a16", "--max-new-tokens", "8", "--calibration-batches", "1",
                    timeout=1200, Q4_LOWER="eager")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    text = next(line for line in lines if line.startswith(prompt))
    assert len(text) > len(prompt) + 4  # eight tokens of continuation
    speed = lines[-1]
    assert "8 new tokens:" in speed and "tokens/s after the first" in speed and "first token in" in speed
    assert float(speed.split("new tokens: ")[1].split()[0]) > 0
    assert "quantized (w4a16) and compiled in" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "Hi", "--recipe", "w9a9"], "unknown recipe 'w9a9'"),
    (["--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--prompt", "Hi", "--calibration-batches", "-1"], "--calibration-batches must be positive"),
    (["--prompt", "Hi", "--model", "/no/such/model/folder"], "no model folder"),
    ([], "--prompt"),
])
def test_generate_rejects_bad_input(args, message):
    proc = generate(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
