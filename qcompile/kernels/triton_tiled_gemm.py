"""Triton: the tuned W4A4 / W4A8 / FP4 GEMM over the tiled weight layout, split-K at small M.

`triton_gemm.linear_w4a4` is the general kernel: any K, the stored layout. This one computes
the same values, bit for bit (`reference.linear_w4a4_ref`), for the weights the lowering re-laid
when it compiled (`gpu_layout.py`: K a multiple of 64, K-major, chunk-interleaved nibbles):

    acc[m, n] = sum_c sum_i x[m, 64c + i] * lo(t[32c + i, n]) + x[m, 64c + 32 + i] * hi(t[32c + i, n])

Every load is contiguous (weight rows along N, activation runs of 32 k); the two nibbles of a
byte go to two int8 `tl.dot`s as in the general kernel.

At decode (M <= 16) a [M, N] output has too few tiles to fill a GPU (Llama-2-7B's q_proj at
BLOCK_N = 64: 64 programs for 132 SMs), so the K loop is split among SPLIT_K programs a tile:
each writes its int32 partial sums to a workspace [SPLIT_K, M, N], and a second kernel adds them
(integers: exact in any order) and applies the epilogue, the same one-rounding-at-a-time float32
arithmetic as the general kernel's. Without a split the first kernel applies it itself.

Tile shapes are tuned per shape class, not per M: M is rounded up to a power of two (at most
2048), so a generation's prompts of many lengths share a few tunings. Each class has its own
candidate configs (`candidates`: split-K and narrow tiles at decode, 128-row tiles with deeper
pipelines at prefill); the first call of a (class, N, K, flags) key times every candidate on the
call's own tensors and keeps the fastest. A candidate that does not fit the GPU (shared memory)
is skipped; running out of GPU memory while tuning raises `TuningError` naming the shape. Under
a CUDA-graph capture nothing is timed (it would synchronize): an untuned key takes its class's
first candidate for that call. In Triton's interpreter (CPU, tests) there is no timing either:
`interpreter_config` picks one tile that splits K at decode, so tests run both paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Optional

import torch
import triton
import triton.language as tl

from . import formats, gpu_layout
from .checks import check_step, describe, fail
from .triton_gemm import (
    INTERPRET,
    TuningError,
    check_codes,
    check_w4a4_operands,
    finish,
    float_nibbles,
    int4_nibbles,
    shape_class,
    w4a4_scaled,
)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # a multiple of gpu_layout.CHUNK
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def candidates(m_class: int) -> list[TileConfig]:
    """The tile configs tuned for M's class: at decode split-K over narrow tiles (weight bytes
    dominate: spread them over the SMs), in between square-ish tiles, at prefill 128-row tiles
    with 3-4 pipeline stages (int8 MMA rate dominates)."""
    if m_class <= 16:
        return [TileConfig(16, bn, bk, split, 4, 4)
                for bn in (32, 64, 128) for bk in (128, 256) for split in (1, 2, 4, 8)]
    if m_class <= 256:
        return [TileConfig(bm, bn, bk, split, 4, 4)
                for bm in (32, 64) for bn in (64, 128) for bk in (128, 256) for split in (1, 2) if bm <= m_class]
    return [TileConfig(bm, bn, bk, 1, warps, stages)
            for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                                               (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (256, 128, 64, 8, 3)]]


def interpreter_config(m: int, n: int, k: int) -> TileConfig:
    """Triton's interpreter (CPU): no timing; small tiles on test shapes, large ones on a model's
    layers (numpy work per tile, see `triton_gemm._interpreter_tile`); K split in two at decode."""
    split = 2 if shape_class(m) <= 16 else 1
    return TileConfig(16, 256, 256, split) if n * k >= 2**16 else TileConfig(16, 32, 64, split)


# --- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _tiled_kernel(x_ptr, wt_ptr, w_step_ptr, a_step_ptr, bias_ptr, out_ptr, part_ptr, M, N, K, mult_ptr, group,
                  HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr, W_MANTISSA: tl.constexpr,
                  ROW_STEPS: tl.constexpr, HAS_MULT: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x int8 [M, K], t the tiled weight uint8 [K/2, N]; program (i, j, s) sums the s-th of
    SPLIT_K runs of K blocks for the tile (i, j): out[m, n] (SPLIT_K = 1, the epilogue applied),
    else the int32 partial part[s, m, n]."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_K // 2)  # byte rows within the K block
    half = K // 2
    blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(blocks, SPLIT_K)
    first = tl.program_id(2) * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for b in range(first, tl.minimum(first + per_split, blocks)):
        r = b * (BLOCK_K // 2) + rr
        in_k = r < half
        w_bytes = tl.load(wt_ptr + r[:, None].to(tl.int64) * N + rn[None, :],
                          mask=in_k[:, None] & (rn[None, :] < N), other=0)
        if W_MANTISSA < 0:
            w_lo, w_hi = int4_nibbles(w_bytes)
        else:
            w_lo, w_hi = float_nibbles(w_bytes, W_MANTISSA)
        k_lo = tl.max_contiguous(tl.multiple_of((r // 32) * 64 + r % 32, 32), 32)  # the low nibbles' k
        if HAS_MULT:  # k and k + 32 share a group when group % 64 == 0, not when it is 32 (w-group=32)
            mult_row = mult_ptr + rn[None, :].to(tl.int64) * (K // group)
            in_w = in_k[:, None] & (rn[None, :] < N)
            w_lo = w_lo * tl.load(mult_row + k_lo[:, None] // group, mask=in_w, other=0).to(tl.int8)
            w_hi = w_hi * tl.load(mult_row + (k_lo[:, None] + 32) // group, mask=in_w, other=0).to(tl.int8)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * K
        x_mask = (rm[:, None] < M) & in_k[None, :]
        acc += tl.dot(tl.load(x_rows + k_lo[None, :], mask=x_mask, other=0), w_lo, out_dtype=tl.int32)
        acc += tl.dot(tl.load(x_rows + (k_lo + 32)[None, :], mask=x_mask, other=0), w_hi, out_dtype=tl.int32)
    if SPLIT_K == 1:
        finish(w4a4_scaled(acc, w_step_ptr, a_step_ptr, rm, rn, M, N, ROW_STEPS), bias_ptr, out_ptr, rm, rn, M, N,
               HAS_BIAS, ROUND_BF16)
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offsets = tl.program_id(2).to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part_ptr + offsets, acc, mask=mask)


@triton.jit
def _split_k_epilogue_kernel(part_ptr, w_step_ptr, a_step_ptr, bias_ptr, out_ptr, M, N,
                             HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr, ROW_STEPS: tl.constexpr,
                             SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = the epilogue of sum_s part[s, m, n] (int32: exact in any order)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offsets = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offsets, mask=mask, other=0)
    finish(w4a4_scaled(acc, w_step_ptr, a_step_ptr, rm, rn, M, N, ROW_STEPS), bias_ptr, out_ptr, rm, rn, M, N,
           HAS_BIAS, ROUND_BF16)


# --- tuning ----------------------------------------------------------------------------------------


class Tuner:
    """The fastest candidate tile of each (shape class, N, K, flags) key, timed on first use."""

    def __init__(self, time_fn: Optional[Callable[[Callable[[], None]], float]] = None):
        self.best: dict[tuple, TileConfig] = {}
        self._time = time_fn or (lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))

    def choose(self, key: tuple, m: int, n: int, k: int, launch: Callable[[TileConfig], None]) -> TileConfig:
        if key in self.best:
            return self.best[key]
        if INTERPRET:
            return interpreter_config(m, n, k)
        options = candidates(shape_class(m))
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # timing would sync in it
            return options[0]
        times = {}
        for config in options:
            try:
                times[config] = self._time(lambda config=config: launch(config))
            except triton.runtime.errors.OutOfResources:
                continue  # more shared memory or registers than this GPU has: not a candidate here
            except torch.OutOfMemoryError as e:
                raise TuningError(
                    f"q4 tiled W4A4 GEMM: out of GPU memory while tuning its tile for M={m}, N={n}, K={k} "
                    f"(config {config}; tuning runs each candidate on the call's tensors and a split-K "
                    f"workspace of up to {max(c.split_k for c in options) * m * n * 4} bytes): free GPU memory "
                    "before the first call of this shape, e.g. run it at a smaller batch first") from e
        if not times:
            raise TuningError(f"q4 tiled W4A4 GEMM: no candidate tile fits this GPU for M={m}, N={n}, K={k} "
                              f"(tried {len(options)}, each out of resources)")
        self.best[key] = min(times, key=times.get)
        return self.best[key]


TUNER = Tuner()


# --- launcher --------------------------------------------------------------------------------------


def _run(config: TileConfig, x2, w_tiled, w_step, a_step, bias, out, k, w_mult, group, flags: dict) -> None:
    m, n = x2.shape[0], w_tiled.shape[1]
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    split = min(config.split_k, triton.cdiv(k, config.block_k))  # every split has a K block
    part = torch.empty((split, m, n), dtype=torch.int32, device=x2.device) if split > 1 else out
    bias_arg = bias if bias is not None else w_step  # w_step stands in for a pointer never read
    _tiled_kernel[(*grid, split)](
        x2, w_tiled, w_step, a_step, bias_arg, out, part, m, n, k, w_mult if w_mult is not None else w_step, group,
        SPLIT_K=split, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False, **flags)
    if split > 1:
        _split_k_epilogue_kernel[grid](
            part, w_step, a_step, bias_arg, out, m, n, HAS_BIAS=flags["HAS_BIAS"], ROUND_BF16=flags["ROUND_BF16"],
            ROW_STEPS=flags["ROW_STEPS"], SPLIT_K=split, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=4, enable_fp_fusion=False)


def linear_w4a4_tiled(x_codes: torch.Tensor, w_tiled: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                      bias: Optional[torch.Tensor], out_dtype: torch.dtype, w_format: str = "int", *,
                      check_values: bool = True, w_mult: Optional[torch.Tensor] = None,
                      config: Optional[TileConfig] = None) -> torch.Tensor:
    """`triton_gemm.linear_w4a4` over the tiled layout: int8 codes [..., K] x w_tiled uint8 [K/2, N]
    (`gpu_layout.to_tiled` of the packed weight) -> [..., N] in out_dtype, bit-exact with
    `reference.linear_w4a4_ref` of the packed weight. `config` forces a tile (tests); else `TUNER`'s."""
    op = "linear_w4a4_tiled (triton)"
    k = check_codes(op, x_codes)
    if w_tiled.dtype != torch.uint8 or w_tiled.dim() != 2 or 2 * w_tiled.shape[0] != k or not gpu_layout.covers(k):
        fail(op, "w_tiled", f"a uint8 tensor [K/2, N] in the tiled layout (gpu_layout.py: K = {k} ({'x_codes'}"
                            f".shape[-1]) a positive multiple of {gpu_layout.CHUNK})", describe(w_tiled))
    n = w_tiled.shape[1]
    check_step(op, "w_step", w_step, (n,), check_values)
    mantissa = check_w4a4_operands(op, x_codes, {"w_tiled": w_tiled}, w_tiled.t(), w_step, a_step, bias, out_dtype,
                                   w_format, w_mult, check_values)
    group = formats.GROUP_ALIGN if w_mult is None else formats.group_size(k, w_mult)
    x2 = x_codes.reshape(math.prod(x_codes.shape[:-1]), k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m and n:
        flags = {"HAS_BIAS": bias is not None, "ROUND_BF16": INTERPRET and out_dtype == torch.bfloat16,
                 "W_MANTISSA": mantissa, "ROW_STEPS": a_step.dim() > 0, "HAS_MULT": w_mult is not None}

        def launch(chosen: TileConfig) -> None:
            _run(chosen, x2, w_tiled, w_step, a_step, bias, out, k, w_mult, group, flags)

        key = (shape_class(m), n, k, out_dtype, *flags.values())
        launch(config or TUNER.choose(key, m, n, k, launch))
    return out.reshape(*x_codes.shape[:-1], n)


__all__ = ["linear_w4a4_tiled", "TileConfig", "TuningError", "Tuner", "TUNER", "candidates", "shape_class",
           "interpreter_config"]
