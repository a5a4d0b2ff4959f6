"""`qcompile bench-gpu`: its table on CPU (tiny model, Triton's interpreter; the numbers mean
nothing, the command and its arithmetic are what is checked), the roofline and work counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcompile.tools import bench_gpu

ROOT = Path(__file__).resolve().parents[2]


def test_device_limits_match_the_gpu_by_name():
    assert bench_gpu.device_limits("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12, 1979e12)
    assert bench_gpu.device_limits("NVIDIA H100 PCIe")[0] == 2.0e12
    assert bench_gpu.device_limits("NVIDIA H200")[0] == 4.8e12
    assert bench_gpu.device_limits("NVIDIA GeForce RTX 3090") is None


def test_the_model_work_of_llama2_7b():
    """2 x the linear parameters a token (6.61e9 with the head), and the KV cache read at decode."""
    spec = {"prefill_tokens": 2048, "context": 128, "decode_steps": 32}
    config = bench_gpu.LLAMA2_7B
    _, ops = bench_gpu._model_work(config, spec, 0, None)
    linear = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert ops == 2 * 2048 * linear + 2 * 2048**2 * 4096 * 32
    read, _ = bench_gpu._model_work(config, spec, 10**9, 16)
    assert read == 10**9 + 16 * (128 + 16) * 2 * 32 * 4096 * 2  # weights + fp16 K and V of 144 tokens


def test_the_roofline_is_the_time_the_limits_allow_over_the_measured_time():
    row = {"label": "GEMM", "unit": 1e6, "higher_is_better": False, "float": 2e-3, "torchao int4 weight-only": None,
           "q4": 1e-3, "bytes": {"float": 4e9, "q4": 1e9}, "ops": {"float": 1e12, "q4": 1e12}, "int8": {"q4"}}
    # float: max(4e9 / 4e12, 1e12 / 1e15) = 1 ms of 2 ms; q4: max(0.25 ms, 0.5 ms) of 1 ms
    assert bench_gpu._roofline(row, (4e12, 1e15, 2e15)) == "50% / - / 50%"
    assert bench_gpu._ratio(row, "float") == "2x" and bench_gpu._ratio(row, "torchao int4 weight-only") == ""
    assert bench_gpu._roofline(row, None) == ""


@pytest.mark.slow
def test_bench_gpu_prints_one_table_on_cpu_through_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile.tools.bench_gpu", "--model", "tiny", "--layers", "1", "--shapes", "128x64,96x40",
         "--m", "1,3",
         "--batches", "2", "--prefill-tokens", "16", "--context", "8", "--decode-steps", "3", "--repeats", "1",
         "--calibration-tokens", "16", "--bandwidth-gbs", "100", "--fp16-tflops", "1", "--int8-tops", "2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(decoder layers: 1)" in proc.stdout
    rows = {line.split("  ")[0].strip(): [c for c in line.split("  ")[1:] if c.strip()]
            for line in proc.stdout.splitlines()}
    labels = ["GEMM 128x64 M=1 µs", "GEMM 128x64 M=3 µs", "GEMM 96x40 M=1 µs", "GEMM 96x40 M=3 µs",
              "decode batch 2 tok/s", "prefill 16 tokens ms", "peak RSS GiB",
              "linear weights GiB"]
    assert all(label in rows for label in labels), proc.stdout
    for label in labels:
        fp32, _, q4 = (c.strip() for c in rows[label][:3])
        assert float(fp32) > 0 and float(q4) > 0, (label, rows[label])
    # q4 holds the linears' weights in 4 bits + a step a row (tiny Llama: 128-wide, not 8x smaller)
    assert float(rows["linear weights GiB"][3].strip().rstrip("x")) > 3
    assert all("%" in rows[label][-1] for label in labels[:6])  # the roofline, with the limits given
