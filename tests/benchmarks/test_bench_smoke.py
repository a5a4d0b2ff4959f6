"""The benchmark scripts run and print their tables (speed is judged in the benchmarks, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_linear_cpu_prints_its_table():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_linear_cpu.py"), "--no-check", "--k", "256", "--n", "128"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "speedup (FP32 / q4)" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines() if line[:4].strip().isdigit()] == ["1", "16", "512", "2048"]


def test_bench_prefill_cpu_prints_its_table():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_prefill_cpu.py"), "--tiny", "--tokens", "32", "--repeats", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split()[:3] for line in proc.stdout.splitlines()]
    variants = [" ".join(r[:2]) if r[:1] == ["q4"] else None for r in rows]
    assert "speedup vs FP32 eager" in proc.stdout
    assert [v for v in variants if v] == ["q4 w4a4", "q4 w4a4-rtn"]
    assert "FP32 + Inductor" in proc.stdout
