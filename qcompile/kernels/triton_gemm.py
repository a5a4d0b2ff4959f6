"""Triton GEMMs over packed 4-bit weights: W4A4 / W4A8 / FP4 (int8 codes), W4A16 (float).

Every kernel reads its weight as it is stored (two 4-bit codes a byte along K, see `int4.py` and
`formats.py`), splits each byte into its two nibbles in registers, and multiplies the even and
the odd k of the activation with them in two `tl.dot`s a K block:

    acc[m, n] = sum_j x[m, 2j] * lo(w[n, j]) + x[m, 2j + 1] * hi(w[n, j])

then applies one epilogue per output element. An odd K needs no padding: the missing x[m, K]
loads as 0 and the weight's padding nibble is 0. With group multipliers (`w_mult` uint8 [N, G],
`formats.py`) each decoded nibble is multiplied in registers by its group's w_mult[n, 2j // group]
(a byte's two k share a group: group is a multiple of 32); value * w_mult still fits int8
(`formats.max_multiplier`), so the int8 dot stays exact and the epilogue is unchanged.

    linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format="int", *, w_mult=None)
        int8 x 4-bit -> int32 acc;  y = float32(acc) * (a_step * w_step[n]) + float32(bias[n])
        (a_step 0-dim, or a dynamic step per row [..., 1]: a_step[m] * w_step[n])
        (= `reference.epilogue`). The codes may be any int8: 8-bit activations (W4A8) and the
        integer values of LLM-FP4's 4-bit floats (`formats.py`: E2M1 +-12, E3M0 +-64, E1M2 +-7)
        run through the same kernel, whose weight nibbles are decoded by `w_format`: FP4 x FP4
        is an exact int8 product (on Hopper int8 and FP8 tensor cores have the same rate).
    linear_w4a16(x, w_packed, w_step, bias, out_dtype, *, w_mult=None)  float x int4 -> fp32 acc
        y = acc * w_step[n] + float32(bias[n])

The epilogues round like the plain-torch twins in `reference.py`, one float32 operation at a time:
kernels are launched with `enable_fp_fusion=False` so that a GPU does not contract the multiply
and the add into one FMA (one rounding instead of two). So the integer paths are bit-exact with
their references in every output dtype.

Launchers check every argument before launching (dtype, shape, contiguity, device, that steps
are finite and > 0, that multipliers are in range) and raise `KernelArgumentError` naming it.
Autotuning is keyed by M's shape class (`shape_class`: M rounded up to a power of two, at most
2048), N and K, and times only tiles no taller than the class: a generation's prompts of many
lengths share a few tunings. These are the general kernels: the lowering sends the weights
whose K is a multiple of 64 to the tuned kernel of `triton_tiled_gemm.py` instead.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors, exactly
and slowly: that is how CI tests them, with a single small tile configuration instead of the
autotuned set.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import formats
from .checks import (
    activation_step_shape,
    check_bias,
    check_contiguous,
    check_device,
    check_float_dtype,
    check_multipliers,
    check_packed,
    check_step,
    describe,
    fail,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if INTERPRET:  # small tiles (masks and several tiles on test shapes); large ones for real layers
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4),
                triton.Config({"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 256}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3),
            (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
        ]
    ]


# --- in-register helpers ---------------------------------------------------------------------------


@triton.jit
def int4_nibbles(b):
    """Two's-complement nibbles of uint8 bytes as int8: (b << 4) >> 4 and b >> 4 (arithmetic shifts)."""
    s = b.to(tl.int8, bitcast=True)
    return (s << 4) >> 4, s >> 4


@triton.jit
def float_nibbles(b, MANTISSA: tl.constexpr):
    """Values of a 4-bit float's nibbles (`formats.FloatFormat`, m = MANTISSA bits) of uint8 bytes
    as int8: sign bit 3, magnitude index i = bits 0-2; the magnitude is i below 2**m (the
    subnormals), else (2**m + (i mod 2**m)) << (i // 2**m - 1)."""
    lo, hi = b & 15, b >> 4
    return _float_value(lo, MANTISSA), _float_value(hi, MANTISSA)


@triton.jit
def _float_value(nibble, MANTISSA: tl.constexpr):
    i = (nibble & 7).to(tl.int8)
    shift = tl.maximum((i >> MANTISSA) - 1, 0)
    magnitude = tl.where(i < (1 << MANTISSA), i, ((1 << MANTISSA) + (i & ((1 << MANTISSA) - 1))) << shift)
    return tl.where((nibble & 8) != 0, -magnitude, magnitude).to(tl.int8)


@triton.jit
def _load_weight_t(w_ptr, rn, j, N, kp):
    """Bytes w[rn, j] of the packed weight [N, kp] as a [j, rn] tile (the dot's right operand), 0 outside it."""
    return tl.load(w_ptr + rn[None, :].to(tl.int64) * kp + j[:, None],
                   mask=(rn[None, :] < N) & (j[:, None] < kp), other=0)


@triton.jit
def _load_multipliers_t(mult_ptr, rn, j, N, K, group):
    """Group multipliers of the bytes w[rn, j] as an int8 [j, rn] tile: w_mult[n, 2j // group] of a
    uint8 [N, K / group] (both nibbles of a byte are in one group), 0 outside the weight."""
    ptrs = mult_ptr + rn[None, :].to(tl.int64) * (K // group) + (2 * j[:, None]) // group
    mult = tl.load(ptrs, mask=(rn[None, :] < N) & (2 * j[:, None] < K), other=0)
    return mult.to(tl.int8)  # at most formats.max_multiplier (18): exact


@triton.jit
def _load_even_odd(x_ptr, rm, j, M, K):
    """x[rm, 2j] and x[rm, 2j + 1] of a row-major [M, K] matrix, 0 outside it (the odd K's last column)."""
    ptrs = x_ptr + rm[:, None].to(tl.int64) * K + 2 * j[None, :]
    in_rows = rm[:, None] < M
    even = tl.load(ptrs, mask=in_rows & (2 * j[None, :] < K), other=0)
    odd = tl.load(ptrs + 1, mask=in_rows & (2 * j[None, :] + 1 < K), other=0)
    return even, odd


@triton.jit
def to_bfloat16_rtne(v):
    """float32 -> bfloat16 rounded to nearest even, as torch and GPUs do: the interpreter's own cast
    truncates. Adding 0x7FFF plus the kept lowest bit to the bits carries exactly when it should."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(v == v, rounded, v.to(tl.bfloat16))  # NaN stays NaN (the carry could make it inf)


@triton.jit
def w4a4_scaled(acc, w_step_ptr, a_step_ptr, rm, rn, M, N, ROW_STEPS: tl.constexpr):
    """float32(acc[m, n]) * (a_step * w_step[n]): the W4A4 epilogue's multiply, before the bias."""
    w_step = tl.load(w_step_ptr + rn, mask=rn < N, other=1.0)
    if ROW_STEPS:  # a dynamic step per row: a_step[m] * w_step[n], rounded once, as the reference
        scale = tl.load(a_step_ptr + rm, mask=rm < M, other=1.0)[:, None] * w_step[None, :]
    else:
        scale = (tl.load(a_step_ptr) * w_step)[None, :]
    return acc.to(tl.float32) * scale


@triton.jit
def finish(out, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out + float32(bias[n]), cast to the output's dtype, stored into the row-major [M, N] output."""
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ROUND_BF16:
        out = to_bfloat16_rtne(out)
    else:
        out = out.to(out_ptr.dtype.element_ty)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out, mask=mask)


# --- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _w4a4_kernel(x_ptr, w_ptr, w_step_ptr, a_step_ptr, bias_ptr, out_ptr, M, N, K, mult_ptr, group, M_CLASS,
                 HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr, W_MANTISSA: tl.constexpr, ROW_STEPS: tl.constexpr,
                 HAS_MULT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x int8 [M, K] (any int8 codes), w packed 4-bit [N, ceil(K/2)]: int4 (W_MANTISSA < 0) or a
    4-bit float with W_MANTISSA mantissa bits; with HAS_MULT, times the group multipliers
    mult[n, k // group] (uint8 [N, K / group]), products that fit int8:

        acc[m, n] = sum_k x[m, k] * w[n, k] (* mult[n, k // group])          (int32, exact)
        out[m, n] = float32(acc) * (a_step * w_step[n]) + float32(bias[n])   (float32, then cast)
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)  # byte index within the K block
    kp = (K + 1) // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        j = k0 * (BLOCK_K // 2) + rj
        w_bytes = _load_weight_t(w_ptr, rn, j, N, kp)
        if W_MANTISSA < 0:
            w_lo, w_hi = int4_nibbles(w_bytes)
        else:
            w_lo, w_hi = float_nibbles(w_bytes, W_MANTISSA)
        if HAS_MULT:
            mult = _load_multipliers_t(mult_ptr, rn, j, N, K, group)
            w_lo, w_hi = w_lo * mult, w_hi * mult
        x_even, x_odd = _load_even_odd(x_ptr, rm, j, M, K)
        acc += tl.dot(x_even, w_lo, out_dtype=tl.int32)
        acc += tl.dot(x_odd, w_hi, out_dtype=tl.int32)
    finish(w4a4_scaled(acc, w_step_ptr, a_step_ptr, rm, rn, M, N, ROW_STEPS), bias_ptr, out_ptr, rm, rn, M, N,
            HAS_BIAS, ROUND_BF16)


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, w_step_ptr, bias_ptr, out_ptr, M, N, K, mult_ptr, group, M_CLASS,
                  HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr, WIDEN_X: tl.constexpr, HAS_MULT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x float [M, K] (fp32/fp16/bf16), w packed int4 [N, ceil(K/2)], its codes (with HAS_MULT, times
    mult[n, k // group]: |codes * mult| <= 120) cast exactly to x's dtype:

        acc[m, n] = sum_k x[m, k] * codes(w)[n, k] (* mult[n, k // group])   (float32 accumulation)
        out[m, n] = acc * w_step[n] + float32(bias[n])                       (float32, then cast)
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)
    kp = (K + 1) // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        j = k0 * (BLOCK_K // 2) + rj
        w_lo, w_hi = int4_nibbles(_load_weight_t(w_ptr, rn, j, N, kp))
        if HAS_MULT:
            mult = _load_multipliers_t(mult_ptr, rn, j, N, K, group)
            w_lo, w_hi = w_lo * mult, w_hi * mult
        x_even, x_odd = _load_even_odd(x_ptr, rm, j, M, K)
        if WIDEN_X:  # the interpreter multiplies bfloat16 as its raw bits: widen (exactly) first
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        acc += tl.dot(x_even, w_lo.to(x_even.dtype), out_dtype=tl.float32, input_precision="ieee")
        acc += tl.dot(x_odd, w_hi.to(x_odd.dtype), out_dtype=tl.float32, input_precision="ieee")
    w_step = tl.load(w_step_ptr + rn, mask=rn < N, other=1.0)
    finish(acc * w_step[None, :], bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS, ROUND_BF16)


MAX_CLASS = 2048  # M above this shares the 2048 class's tuning


class TuningError(RuntimeError):
    """Tuning a GEMM tile failed for a reason the caller must act on (out of GPU memory)."""


def shape_class(m: int) -> int:
    """The power of two >= m that names M's tuning (at most MAX_CLASS): a generation's prompts of
    many lengths share a few tunings instead of one each."""
    return min(1 << max(m - 1, 0).bit_length(), MAX_CLASS)


def _tiles_for_the_class(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs worth timing for M's class: none whose BLOCK_M is above max(16, the class)
    (rows of zeros). In the interpreter one config and no tuning: each tile costs milliseconds
    of numpy work, so a model's layers (N * K >= 2**16) take the large tile (SmolLM2's head:
    576 tiles, not 13,824)."""
    if INTERPRET:
        n, k = named_args["N"], named_args["K"]
        return [configs[1] if n * k >= 2**16 else configs[0]]
    rows = max(16, named_args["M_CLASS"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows]


_PRUNE = {"early_config_prune": _tiles_for_the_class}
_KEY = ["M_CLASS", "N", "K", "HAS_MULT"]
_w4a4 = triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_PRUNE)(_w4a4_kernel)
_w4a16 = triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_PRUNE)(_w4a16_kernel)


# --- launchers -------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as a matrix [M, K] (a view); reshape(-1, K) would be ambiguous for K = 0."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _launch(kernel, x2: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], out_dtype: torch.dtype, k: int, w_mult: Optional[torch.Tensor],
            **flags) -> torch.Tensor:
    """out [M, N] = kernel(x2 [M, ...], w_packed [N, ...] (times w_mult's groups)); empty products need no launch."""
    m, n = x2.shape[0], w_packed.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # an empty sum: the bias alone
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    steps = (w_step,) if a_step is None else (w_step, a_step)
    # w_step stands in for a pointer never read (no bias, no multipliers)
    group = formats.GROUP_ALIGN if w_mult is None else formats.group_size(k, w_mult)
    try:
        kernel[grid](x2, w_packed, *steps, bias if bias is not None else w_step, out, m, n, k,
                     w_mult if w_mult is not None else w_step, group, shape_class(m), HAS_BIAS=bias is not None,
                     ROUND_BF16=INTERPRET and out_dtype == torch.bfloat16, HAS_MULT=w_mult is not None,
                     enable_fp_fusion=False, **flags)
    except torch.OutOfMemoryError as e:  # the autotuner's timing buffers, at a key's first call
        raise TuningError(f"q4 Triton GEMM: out of GPU memory while autotuning its tile for M={m} (class "
                          f"{shape_class(m)}), N={n}, K={k}: free GPU memory before the first call of this shape, "
                          "e.g. run it at a smaller batch first") from e
    return out


def check_codes(op: str, x_codes: torch.Tensor) -> int:
    """K of int8 activation codes [..., K]."""
    if x_codes.dtype != torch.int8 or x_codes.dim() < 1:
        fail(op, "x_codes", "an int8 tensor [..., K] of activation codes", describe(x_codes))
    return x_codes.shape[-1]


def check_w4a4_operands(op: str, x_codes: torch.Tensor, weight: dict[str, torch.Tensor], rows: torch.Tensor,
                        w_step: torch.Tensor, a_step: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                        w_format: str, w_mult: Optional[torch.Tensor], check_values: bool) -> int:
    """The checks a W4A4 launcher makes once its weight (`weight`: its name and tensor; `rows`: a
    view with one row an output channel) is checked: the other operands' shapes, devices,
    contiguity and values. The kernel's W_MANTISSA for `w_format` (-1: int)."""
    check_step(op, "a_step", a_step, activation_step_shape(x_codes, a_step), check_values=check_values)
    check_bias(op, bias, rows.shape[0])
    check_device(op, x_codes, **weight, w_step=w_step, a_step=a_step, bias=bias, w_mult=w_mult)
    check_contiguous(op, x_codes=x_codes, **weight, w_step=w_step, a_step=a_step, bias=bias, w_mult=w_mult)
    check_float_dtype(op, "out_dtype", out_dtype)
    if w_format not in formats.FORMATS:
        fail(op, "w_format", f"one of {', '.join(formats.FORMATS)}", repr(w_format))
    check_multipliers(op, w_mult, rows, x_codes.shape[-1], w_format, check_values=check_values)
    return -1 if w_format == formats.INT else formats.FLOAT_FORMATS[w_format].mantissa_bits


def linear_w4a4(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype, w_format: str = "int", *,
                check_values: bool = True, w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`q4::linear_w4a4` in Triton: int8 codes [..., K] x packed 4-bit [N, ceil(K/2)] in `w_format`
    (formats.py) -> [..., N] in out_dtype.

    y = float32(x_codes @ values(w).T) * (a_step * w_step) + float32(bias), bit-exact with
    `reference.linear_w4a4_ref`. w_step float32 [N], a_step 0-dim float32 (finite, > 0).
    values = the codes' values, times w_mult[n, k // group] with group multipliers (uint8 [N, G],
    K = G * group, group a multiple of 32, each in 1..formats.max_multiplier(w_format)).
    `check_values=False` skips reading the steps' and multipliers' values (a GPU sync, which
    CUDA-graph capture forbids); the op's CUDA kernel passes it, as its steps are graph constants
    checked when made.
    """
    op = "linear_w4a4 (triton)"
    k = check_codes(op, x_codes)
    check_packed(op, w_packed, w_step, k, "x_codes.shape[-1]", check_values=check_values)
    mantissa = check_w4a4_operands(op, x_codes, {"w_packed": w_packed}, w_packed, w_step, a_step, bias, out_dtype,
                                   w_format, w_mult, check_values)
    out = _launch(_w4a4, _rows(x_codes), w_packed, w_step, a_step, bias, out_dtype, k, w_mult, W_MANTISSA=mantissa,
                  ROW_STEPS=a_step.dim() > 0)
    return out.reshape(*x_codes.shape[:-1], w_packed.shape[0])


def linear_w4a16(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, bias: Optional[torch.Tensor],
                 out_dtype: Optional[torch.dtype] = None, *, check_values: bool = True,
                 w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int4: float x [..., K] x packed int4 [N, ceil(K/2)] -> [..., N] in out_dtype
    (default: x's dtype); y = (x @ values(w).T) * w_step + bias with fp32 accumulation, values = the
    codes, times w_mult[n, k // group] with group multipliers (uint8 [N, G], each in 1..15).
    `check_values=False` skips reading the steps' and multipliers' values, as `linear_w4a4`'s."""
    op = "linear_w4a16 (triton)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 1:
        fail(op, "x", "a float32, float16 or bfloat16 tensor [..., K]", describe(x))
    k = x.shape[-1]
    check_packed(op, w_packed, w_step, k, "x.shape[-1]", check_values=check_values)
    check_bias(op, bias, w_packed.shape[0])
    check_device(op, x, w_packed=w_packed, w_step=w_step, bias=bias, w_mult=w_mult)
    check_contiguous(op, x=x, w_packed=w_packed, w_step=w_step, bias=bias, w_mult=w_mult)
    check_multipliers(op, w_mult, w_packed, k, formats.INT, check_values=check_values)
    out_dtype = out_dtype or x.dtype
    check_float_dtype(op, "out_dtype", out_dtype)
    out = _launch(_w4a16, _rows(x), w_packed, w_step, None, bias, out_dtype, k, w_mult,
                  WIDEN_X=INTERPRET and x.dtype == torch.bfloat16)
    return out.reshape(*x.shape[:-1], w_packed.shape[0])


__all__ = ["linear_w4a4", "linear_w4a16", "INTERPRET", "TuningError", "shape_class"]
