"""q4 CPU linear vs FP32 F.linear, measured side by side in one run.

    python benchmarks/bench_linear_cpu.py [--no-check]

The q4 path is what a quantized layer pays at run time: the static activation quantize
(q4::quantize_per_tensor of a float input) plus q4::linear_w4a4 (int4 x int4 -> int32, epilogue).
Times are medians over repetitions after warm-up. Exits 1 when q4 is below 1.5x FP32 at M >= 512.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from tabulate import tabulate

from qcompile.kernels import int4
from qcompile.kernels import ops as _ops  # noqa: F401  (registers torch.ops.q4)

q4 = torch.ops.q4
TARGET = 1.5


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help="do not fail below the 1.5x target")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args()

    torch.manual_seed(0)
    k, n = args.k, args.n
    weight = torch.randn(n, k)
    codes, w_step = int4.quantize_weight_per_channel(weight)
    packed = int4.pack_int4(codes)
    rows, failed = [], False
    with torch.no_grad():
        for m in (1, 16, 512, 2048):
            x = torch.randn(m, k)
            a_step = x.abs().max() / 7
            repeats = 50 if m <= 16 else 10
            fp32 = median_ms(lambda: torch.nn.functional.linear(x, weight), repeats)
            quant = median_ms(
                lambda: q4.linear_w4a4(q4.quantize_per_tensor(x, a_step, 4), packed, w_step, a_step, None, torch.float32),
                repeats,
            )
            speedup = fp32 / quant
            failed |= m >= 512 and speedup < TARGET
            rows.append([m, fp32, quant, speedup])
    weight_bytes = weight.numel() * weight.element_size()
    q4_bytes = packed.numel() + w_step.numel() * 4
    print(f"q4 CPU linear (quantize + linear_w4a4) vs FP32 F.linear, K={k} N={n}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(tabulate(rows, headers=["M", "FP32 ms", "q4 ms", "speedup (FP32 / q4)"], floatfmt=("", ".3f", ".3f", ".2f")))
    print(f"weight bytes: FP32 {weight_bytes:,}  q4 {q4_bytes:,}  ({weight_bytes / q4_bytes:.2f}x smaller)")
    if failed and not args.no_check:
        print(f"FAIL: q4 is below {TARGET}x FP32 at M >= 512", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
