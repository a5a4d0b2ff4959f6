"""The benchmark commands run and print their tables (speed is judged in the benchmarks, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_kernels_prints_its_table():
    out = run("-m", "qcompile.tools.bench", "kernels", "--shapes", "256x128,257x100", "--m", "1,3,65", "--repeats", "2")
    assert "q4 W4A4 (CPU) speedup" in out and "FP32 F.linear ms" in out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [(k, n, m) for k, n in (("256", "128"), ("257", "100"))
                                                  for m in ("1", "3", "65")]
    # up to 64 rows (W4A16: 256) the C++ kernels reading packed weights; W4A4 at 65 the GEMM
    assert [r[3] for r in rows] == ["q4_cpu/q4_cpu", "q4_cpu/q4_cpu", "GEMM/q4_cpu"] * 2
    assert all(float(v) > 0 for r in rows for v in r[4:])


def test_bench_kernels_rejects_a_malformed_shape():
    proc = subprocess.run([sys.executable, "-m", "qcompile.tools.bench", "kernels", "--shapes", "4096by11008"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "KxN pairs" in proc.stderr


@pytest.mark.slow
def test_bench_prefill_prints_its_table():
    out = run(str(ROOT / "benchmarks" / "bench_prefill_cpu.py"), "--tiny", "--tokens", "32", "--repeats", "2")
    rows = [line.split()[:3] for line in out.splitlines()]
    variants = [" ".join(r[:2]) if r[:1] == ["q4"] else None for r in rows]
    assert "speedup vs FP32 eager" in out
    assert [v for v in variants if v] == ["q4 w4a4", "q4 w4a4-rtn"]
    assert "FP32 + Inductor" in out


def test_bench_memory_prints_its_table():
    out = run("-m", "qcompile.tools.bench", "memory", "--tiny", "--recipe", "w4a4-rtn", "--calibration-tokens", "256",
              "--window", "128")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("recipe"))
    for column in ("model MiB (M)", "one batch's activations MiB (A)", "quantize peak above baseline MiB",
                   "target 2M + A MiB", "peak / target", "quantize s"):
        assert column in lines[header]
    row = lines[header + 2].split()
    assert row[0] == "w4a4-rtn" and "2 batches, lower=eager" in out
    assert all(float(v) > 0 for v in row[1:])
