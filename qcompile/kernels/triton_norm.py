"""Triton: normalization fused with the static per-tensor quantize of its output.

One program normalizes one row of x [M, H] (H <= 65536, the row in registers), reading it once:

    rms_norm_quantize:    y = x * rsqrt(mean(x^2) + eps) * weight
    layer_norm_quantize:  y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias
    codes = clamp(round_half_even(y / a_step), -2**(bits-1), 2**(bits-1) - 1)      int8 [M, H]

all in float32, and writes the codes (and, with `return_normalized`, y in x's dtype, for a
residual stream or a float reader). The twins are `reference.rms_norm_quantize_ref` and
`reference.layer_norm_quantize_ref`; the row sums are reduced in another order than torch's,
so y may differ in the last bits and a code may differ by one where y / a_step sits on a tie.
The square root and the divisions are the correctly rounded ones (`sqrt_rn`, `div_rn`), as on
the CPU, not a GPU's faster approximations, so that no other difference adds to that one.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_contiguous, check_device, check_step, describe, fail
from .triton_gemm import INTERPRET, to_bfloat16_rtne

MAX_WIDTH = 65536


@triton.jit
def _round_half_even(v):
    """Round to the nearest integer, ties to even (torch.round), for float32 v."""
    t = tl.floor(v)
    frac = v - t  # exact for |v| < 2**23; larger floats are integers already (frac 0)
    t_is_odd = (t - 2.0 * tl.floor(t * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & t_is_odd)
    return tl.where(up, t + 1.0, t)


@triton.jit
def _norm_quantize_kernel(x_ptr, w_ptr, b_ptr, step_ptr, codes_ptr, y_ptr, H, eps, qmin, qmax,
                          LAYER: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          WRITE_Y: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """codes[row] = quantize(norm(x[row])) and optionally y[row] = norm(x[row]) (module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    if LAYER:
        x = tl.where(mask, x - tl.sum(x, axis=0) / H, 0.0)
    y = x * tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / H + eps))  # torch.rsqrt: 1 / sqrt, both rounded
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    codes = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(y, tl.load(step_ptr))), qmin), qmax)
    tl.store(codes_ptr + row * H + cols, codes.to(tl.int8), mask=mask)
    if WRITE_Y:
        if ROUND_BF16:
            y = to_bfloat16_rtne(y)
        tl.store(y_ptr + row * H + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _norm_quantize(op: str, layer: bool, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, a_step: torch.Tensor, bits: int, return_normalized: bool):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 1:
        fail(op, "x", "a float32, float16 or bfloat16 tensor [..., H]", describe(x))
    h = x.shape[-1]
    if not 1 <= h <= MAX_WIDTH:
        fail(op, "x", f"a last dimension in 1..{MAX_WIDTH}", describe(x))
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not t.is_floating_point() or tuple(t.shape) != (h,)):
            fail(op, arg, f"None or a float tensor of shape ({h},)", describe(t))
    check_step(op, "a_step", a_step, (), check_values=True)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        fail(op, "bits", "an int in 2..8", repr(bits))
    if not eps >= 0:
        fail(op, "eps", "a float >= 0", repr(eps))
    check_device(op, x, weight=weight, bias=bias, a_step=a_step)
    check_contiguous(op, x=x, weight=weight, bias=bias)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    y = torch.empty_like(x) if return_normalized else None
    rows = x.numel() // h
    if rows:
        dummy = a_step  # a valid pointer for absent tensors; never read
        qmax = 2 ** (bits - 1) - 1
        block = triton.next_power_of_2(h)
        _norm_quantize_kernel[(rows,)](
            x, weight if weight is not None else dummy, bias if bias is not None else dummy, a_step, codes,
            y if y is not None else codes, h, float(eps), float(-qmax - 1), float(qmax),
            LAYER=layer, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, WRITE_Y=y is not None,
            ROUND_BF16=INTERPRET and x.dtype == torch.bfloat16, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),  # a wide row in registers needs more threads
        )
    return (codes, y) if return_normalized else codes


def rms_norm_quantize(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, a_step: torch.Tensor, bits: int,
                      return_normalized: bool = False):
    """RMSNorm fused with the static quantize: int8 codes of x's shape (and y if asked)."""
    return _norm_quantize("rms_norm_quantize (triton)", False, x, weight, None, eps, a_step, bits, return_normalized)


def layer_norm_quantize(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        a_step: torch.Tensor, bits: int, return_normalized: bool = False):
    """LayerNorm fused with the static quantize: int8 codes of x's shape (and y if asked)."""
    return _norm_quantize("layer_norm_quantize (triton)", True, x, weight, bias, eps, a_step, bits, return_normalized)
