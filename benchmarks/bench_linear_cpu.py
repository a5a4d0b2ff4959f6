"""q4 CPU linear vs FP32 F.linear, measured side by side in one run.

    python benchmarks/bench_linear_cpu.py [--no-check] [--k 2048] [--n 2048] [--repeats R]

The q4 path is what a quantized layer pays at run time: the static activation quantize
(q4::quantize_per_tensor of the float input) plus q4::linear_w4a4 (int4 weight unpacked inside
the call, int8 x int8 -> int32 matmul, float epilogue). The two paths are timed alternately, one
call each per repetition, so load from other processes hits both alike; the table shows the
median over repetitions after warm-up. Weight bytes: FP32 weight vs packed int4 + float32 steps.
Exits 1 when q4 is below 1.5x FP32 at M >= 512 (unless --no-check).
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
M_VALUES = (1, 16, 512, 2048)


def side_by_side_ms(fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median wall time of each function in ms, calling them in turn each repetition."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) * 1e3 for ts in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help=f"do not exit 1 below {TARGET}x at M >= 512")
    parser.add_argument("--k", type=int, default=2048, help="in features (default 2048)")
    parser.add_argument("--n", type=int, default=2048, help="out features (default 2048)")
    parser.add_argument("--repeats", type=int, default=0, help="repetitions a size (default: 40 for M <= 16, else 10)")
    args = parser.parse_args()

    torch.manual_seed(0)
    k, n = args.k, args.n
    weight = torch.randn(n, k)
    codes, w_step = int4.quantize_weight_per_channel(weight)
    packed = int4.pack_int4(codes)
    del codes  # the q4 path keeps only the packed weight and its steps
    fp32_bytes = weight.numel() * weight.element_size()
    q4_bytes = packed.numel() * packed.element_size() + w_step.numel() * w_step.element_size()

    rows, failed = [], []
    with torch.inference_mode():
        for m in M_VALUES:
            x = torch.randn(m, k)
            a_step = x.abs().max() / 7  # a calibrated static step, fixed before the timed calls
            repeats = args.repeats or (40 if m <= 16 else 10)
            fp32_ms, q4_ms = side_by_side_ms([
                lambda: torch.nn.functional.linear(x, weight),
                lambda: q4.linear_w4a4(q4.quantize_per_tensor(x, a_step, 4), packed, w_step, a_step, None,
                                       torch.float32),
            ], repeats)
            speedup = fp32_ms / q4_ms
            if m >= 512 and speedup < TARGET:
                failed.append(m)
            rows.append([m, fp32_ms, q4_ms, speedup, f"{fp32_bytes:,}", f"{q4_bytes:,}"])

    print(f"q4 CPU linear (quantize_per_tensor + linear_w4a4) vs FP32 F.linear, K={k} N={n}, "
          f"torch.get_num_threads()={torch.get_num_threads()}, torch {torch.__version__}")
    print(tabulate(rows, headers=["M", "FP32 ms", "q4 ms", "speedup (FP32 / q4)", "FP32 weight bytes",
                                  "q4 weight bytes"],
                   floatfmt=("", ".3f", ".3f", ".2f", "", ""), colalign=("right",) * 6))
    print(f"q4 weight is {fp32_bytes / q4_bytes:.2f}x smaller than FP32 (int4 codes + one float32 step a row)")
    if failed and not args.no_check:
        print(f"FAIL: q4 is below {TARGET}x FP32 at M = {', '.join(map(str, failed))} (target holds for M >= 512)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
