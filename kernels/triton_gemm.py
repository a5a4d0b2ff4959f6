"""Triton GEMMs over packed 4-bit weights: W4A4 / W4A8 (int8 codes), W4A16 (float), FP4 (E2M1).

Every kernel reads its weight as it is stored (two 4-bit codes a byte along K, `int4.py`,
`fp4.py`), splits each byte into its two nibbles in registers, and multiplies the even and the
odd k of the activation with them in two `tl.dot`s a K block:

    acc[m, n] = sum_j x[m, 2j] * lo(w[n, j]) + x[m, 2j + 1] * hi(w[n, j])

then applies one epilogue per output element. An odd K needs no padding: the missing x[m, K]
loads as 0 and the weight's padding nibble is 0.

    linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype)   int8 x int4 -> int32 acc
        y = float32(acc) * (a_step * w_step[n]) + float32(bias[n])  (`reference.epilogue`)
        The codes may be any int8: 8-bit activations (W4A8) run through the same kernel.
    linear_w4a16(x, w_packed, w_step, bias, out_dtype)                float x int4 -> fp32 acc
        y = acc * w_step[n] + float32(bias[n])
    linear_fp4(x_packed, w_packed, w_scale, a_scale, bias, out_dtype)  E2M1 x E2M1
        On GPUs with FP8 (compute capability >= 8.9) the E2M1 values become float8 E4M3 (each
        is exact there) for an fp32-accumulating FP8 dot; elsewhere twice each value is an
        integer in [-12, 12], multiplied as int8 with int32 accumulation (exact):
        y = float32(acc) * (a_scale * w_scale[n] * 0.25) + float32(bias[n])

Launchers check every argument before launching (dtype, shape, contiguity, device, and that
steps are finite and > 0) and raise `KernelArgumentError` naming it. Under TRITON_INTERPRET=1
(set before triton is imported) the kernels run on CPU tensors, exactly and slowly: that is
how CI tests them, with a single small tile configuration instead of the autotuned set.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import fp4
from .ops import _check_device, _check_float_dtype, _check_packed, _check_step, _describe, _fail

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if INTERPRET:  # every config would be run to tune: keep one, small
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3),
            (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
        ]
    ]


# --- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _lo_hi_int4(b):
    """Two's-complement nibbles of uint8 bytes as int8: (b << 4) >> 4 and b >> 4 (arithmetic)."""
    s = b.to(tl.int8, bitcast=True)
    return (s << 4) >> 4, s >> 4


@triton.jit
def _e2m1_twice(nibble):
    """2 * value of an E2M1 code as int8: sign bit 3, magnitude index i = bits 0-2 with values
    [0, .5, 1, 1.5, 2, 3, 4, 6]; twice that is i for i < 2, else (2 + (i & 1)) << (i // 2 - 1)."""
    i = (nibble & 7).to(tl.int8)
    shift = tl.maximum((i >> 1) - 1, 0)
    twice = tl.where(i < 2, i, (2 + (i & 1)) << shift)
    return tl.where((nibble & 8) != 0, -twice, twice).to(tl.int8)


@triton.jit
def _w4_gemm_kernel(x_ptr, w_ptr, w_step_ptr, a_step_ptr, bias_ptr, out_ptr, M, N, K,
                    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, FLOAT32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = epilogue(sum_k x[m, k] * w[n, k]) for a packed 4-bit w [N, ceil(K/2)] bytes.

    MODE 0 (W4A4/W4A8): x int8 codes [M, K], w int4; int32 acc; out = f32(acc) * (a_step * w_step[n]) + bias[n].
    MODE 1 (W4A16): x float [M, K], w int4 codes in x's dtype; fp32 acc; out = acc * w_step[n] + bias[n].
    MODE 2 (FP4, integer emulation): x and w packed E2M1; acc = sum (2x)(2w) in int32;
        out = f32(acc) * (a_step * w_step[n] * 0.25) + bias[n].
    MODE 3 (FP4 on FP8 hardware): as MODE 2 with the values as float8 E4M3 and fp32 acc of x * w;
        out = acc * (a_step * w_step[n]) + bias[n].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)  # byte index within the K block
    kp = (K + 1) // 2
    x_packed_input: tl.constexpr = MODE >= 2
    if MODE == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif MODE == 3:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        j = k0 * (BLOCK_K // 2) + rj
        w_bytes = tl.load(w_ptr + rn[None, :] * kp + j[:, None], mask=(rn[None, :] < N) & (j[:, None] < kp), other=0)
        if x_packed_input:
            x_bytes = tl.load(x_ptr + rm[:, None] * kp + j[None, :], mask=(rm[:, None] < M) & (j[None, :] < kp), other=0)
            x_even, x_odd = _e2m1_twice(x_bytes & 15), _e2m1_twice(x_bytes >> 4)
            w_lo, w_hi = _e2m1_twice(w_bytes & 15), _e2m1_twice(w_bytes >> 4)
            if MODE == 3:  # exact: (2v) / 2 is an E2M1 value, representable in E4M3
                acc += tl.dot((x_even.to(tl.float32) * 0.5).to(tl.float8e4nv),
                              (w_lo.to(tl.float32) * 0.5).to(tl.float8e4nv), out_dtype=tl.float32)
                acc += tl.dot((x_odd.to(tl.float32) * 0.5).to(tl.float8e4nv),
                              (w_hi.to(tl.float32) * 0.5).to(tl.float8e4nv), out_dtype=tl.float32)
            else:
                acc += tl.dot(x_even, w_lo, out_dtype=tl.int32)
                acc += tl.dot(x_odd, w_hi, out_dtype=tl.int32)
        else:
            x_mask = rm[:, None] < M
            x_even = tl.load(x_ptr + rm[:, None] * K + 2 * j[None, :], mask=x_mask & (2 * j[None, :] < K), other=0)
            x_odd = tl.load(x_ptr + rm[:, None] * K + 2 * j[None, :] + 1, mask=x_mask & (2 * j[None, :] + 1 < K), other=0)
            w_lo, w_hi = _lo_hi_int4(w_bytes)
            if MODE == 1:
                if FLOAT32_DOT:  # the interpreter multiplies bfloat16 as raw bits: widen (exactly) first
                    x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                acc += tl.dot(x_even, w_lo.to(x_even.dtype), out_dtype=tl.float32, input_precision="ieee")
                acc += tl.dot(x_odd, w_hi.to(x_odd.dtype), out_dtype=tl.float32, input_precision="ieee")
            else:
                acc += tl.dot(x_even, w_lo, out_dtype=tl.int32)
                acc += tl.dot(x_odd, w_hi, out_dtype=tl.int32)
    n_mask = rn < N
    w_step = tl.load(w_step_ptr + rn, mask=n_mask, other=1.0)
    if MODE == 1:
        scale = w_step
    elif MODE == 2:
        scale = tl.load(a_step_ptr) * w_step * 0.25
    else:
        scale = tl.load(a_step_ptr) * w_step
    out = acc.to(tl.float32) * scale[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    o_mask = (rm[:, None] < M) & n_mask[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)


_w4_gemm = triton.autotune(configs=_configs(), key=["M", "N", "K", "MODE"])(_w4_gemm_kernel)


# --- launchers -------------------------------------------------------------------------------------


def _check_contiguous(op: str, **tensors: Optional[torch.Tensor]) -> None:
    for arg, t in tensors.items():
        if t is not None and not t.is_contiguous():
            _fail(op, arg, "contiguous (call .contiguous() first)", f"strides {t.stride()} for {_describe(t)}")


def _check_bias(op: str, bias: Optional[torch.Tensor], n: int) -> None:
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        _fail(op, "bias", f"None or a float tensor of shape ({n},)", _describe(bias))


def _launch(mode: int, x2: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], out_dtype: torch.dtype, k: int) -> torch.Tensor:
    m, n = x2.shape[0], w_packed.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # an empty sum: the bias alone
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    a = a_step if a_step is not None else w_step  # MODE 1 reads no activation step
    b = bias if bias is not None else w_step  # a valid pointer never read without HAS_BIAS
    _w4_gemm[grid](x2, w_packed, w_step, a, b, out, m, n, k, HAS_BIAS=bias is not None, MODE=mode,
                   FLOAT32_DOT=INTERPRET and x2.dtype == torch.bfloat16)
    return out


def linear_w4a4(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """`q4::linear_w4a4` in Triton: int8 codes [..., K] x packed int4 [N, ceil(K/2)] -> [..., N]."""
    op = "linear_w4a4 (triton)"
    if x_codes.dtype != torch.int8 or x_codes.dim() < 1:
        _fail(op, "x_codes", "an int8 tensor [..., K] of activation codes", _describe(x_codes))
    k = x_codes.shape[-1]
    _check_packed(op, w_packed, w_step, k, "x_codes.shape[-1]", check_values=True)
    _check_step(op, "a_step", a_step, (), check_values=True)
    _check_bias(op, bias, w_packed.shape[0])
    _check_device(op, x_codes, w_packed=w_packed, w_step=w_step, a_step=a_step, bias=bias)
    _check_contiguous(op, x_codes=x_codes, w_packed=w_packed, w_step=w_step, bias=bias)
    _check_float_dtype(op, "out_dtype", out_dtype)
    out = _launch(0, x_codes.reshape(-1, k), w_packed, w_step, a_step, bias, out_dtype, k)
    return out.reshape(*x_codes.shape[:-1], w_packed.shape[0])


def linear_w4a16(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, bias: Optional[torch.Tensor],
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Weight-only int4: float x [..., K] x packed int4 [N, ceil(K/2)] -> [..., N] in out_dtype
    (default: x's dtype); y = (x @ codes.T) * w_step + bias with fp32 accumulation."""
    op = "linear_w4a16 (triton)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 1:
        _fail(op, "x", "a float32, float16 or bfloat16 tensor [..., K]", _describe(x))
    k = x.shape[-1]
    _check_packed(op, w_packed, w_step, k, "x.shape[-1]", check_values=True)
    _check_bias(op, bias, w_packed.shape[0])
    _check_device(op, x, w_packed=w_packed, w_step=w_step, bias=bias)
    _check_contiguous(op, x=x, w_packed=w_packed, w_step=w_step, bias=bias)
    out_dtype = out_dtype or x.dtype
    _check_float_dtype(op, "out_dtype", out_dtype)
    out = _launch(1, x.reshape(-1, k), w_packed, w_step, None, bias, out_dtype, k)
    return out.reshape(*x.shape[:-1], w_packed.shape[0])


def fp8_dot_available(device: torch.device) -> bool:
    """Whether the FP4 GEMM multiplies in float8 E4M3 on this device (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability(device) >= (8, 9)


def linear_fp4(x_packed: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype, k: int) -> torch.Tensor:
    """FP4 (E2M1) linear: x_packed uint8 [..., ceil(k/2)] and w_packed uint8 [N, ceil(k/2)] (`fp4.py`),
    w_scale float32 [N], a_scale 0-dim float32 -> [..., N]: y = (x @ w.T) * a_scale * w_scale + bias."""
    op = "linear_fp4 (triton)"
    if x_packed.dtype != torch.uint8 or x_packed.dim() < 1 or x_packed.shape[-1] != (k + 1) // 2:
        _fail(op, "x_packed", f"a uint8 tensor [..., ceil(k/2) = {(k + 1) // 2}] of packed E2M1 codes", _describe(x_packed))
    _check_packed(op, w_packed, w_scale, k, "argument 'k'", check_values=True)
    _check_step(op, "a_scale", a_scale, (), check_values=True)
    _check_bias(op, bias, w_packed.shape[0])
    _check_device(op, x_packed, w_packed=w_packed, w_scale=w_scale, a_scale=a_scale, bias=bias)
    _check_contiguous(op, x_packed=x_packed, w_packed=w_packed, w_scale=w_scale, bias=bias)
    _check_float_dtype(op, "out_dtype", out_dtype)
    mode = 3 if fp8_dot_available(x_packed.device) else 2
    out = _launch(mode, x_packed.reshape(-1, x_packed.shape[-1]), w_packed, w_scale, a_scale, bias, out_dtype, k)
    return out.reshape(*x_packed.shape[:-1], w_packed.shape[0])


__all__ = ["linear_w4a4", "linear_w4a16", "linear_fp4", "fp8_dot_available", "fp4"]
