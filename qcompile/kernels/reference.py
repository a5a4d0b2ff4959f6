"""Plain-torch twins of every q4 kernel: the definition of the math, used by tests.

They take an independent route to the integers: their own nibble unpacking (masks and a
where, no shift tricks) and an exact int64 matmul instead of the kernels' `torch._int_mm`.
They share only `epilogue` with the kernels: the float arithmetic after the integer
accumulation is part of the op's definition, and keeping one copy of it is what makes
kernel == reference bit-exact.
"""

from __future__ import annotations

import torch

from . import formats
from .int4 import quantize_weight_per_channel


def epilogue(acc: torch.Tensor, a_step: torch.Tensor, w_step: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype, in_place: bool = True) -> torch.Tensor:
    """out = (float32(acc) * (a_step * w_step) + float32(bias)).to(out_dtype): the one epilogue.

    `acc` is the int32 accumulator [M, N]; its float32 conversion is exact while |acc| < 2**24.
    a_step is 0-dim, or one step per row of acc, of any shape [..., 1] (a dynamic step, as
    q4.token_steps makes it: x's leading dims). The product of the steps is rounded
    first (one float32 [N] vector, or [M, N] with row steps), then each element is
    multiplied once, then the bias added once, all in float32. In-place ops on the fresh float32
    copy of `acc` save allocating (and page-faulting) two more [M, N] buffers; same rounding.
    `in_place=False` for tracers that want functional ops (the Inductor lowering).
    """
    if acc.dtype != torch.int32:
        raise TypeError(f"epilogue: acc must be an int32 accumulator, got {acc.dtype}")
    out = acc.to(torch.float32)
    scale = (a_step.reshape(-1, 1) if a_step.dim() else a_step) * w_step
    out = out.mul_(scale) if in_place else out * scale
    if bias is not None:
        out = out.add_(bias.to(torch.float32)) if in_place else out + bias.to(torch.float32)
    return out.to(out_dtype)


def unpack_int4_ref(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(k/2)] -> int8 [N, k]: nibble v in 0..15 means v - 16 when v >= 8."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).to(torch.int16)  # [N, ceil(k/2), 2]
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.reshape(packed.shape[0], 2 * packed.shape[1])[:, :k].to(torch.int8)


def unpack_ref(packed: torch.Tensor, k: int, fmt: str = "int") -> torch.Tensor:
    """uint8 [N, ceil(k/2)] -> int8 values [N, k] of 4-bit codes in `fmt`: int4 by unpack_int4_ref;
    a float nibble is sign (bit 3) and an index into the format's magnitudes (bits 0-2)."""
    if fmt == formats.INT:
        return unpack_int4_ref(packed, k)
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])[:, :k]
    magnitude = torch.tensor(formats.FLOAT_FORMATS[fmt].magnitudes, dtype=torch.int16)[(nibbles & 7).long()]
    return torch.where(nibbles >= 8, -magnitude, magnitude).to(torch.int8)


def weight_values_ref(packed: torch.Tensor, k: int, fmt: str = "int", w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """int16 [N, k]: the integers a weight's kernels multiply, value(code) * w_mult of its group
    (formats.py), by a loop over the groups rather than formats.apply_multipliers' broadcast."""
    values = unpack_ref(packed, k, fmt).to(torch.int16)
    if w_mult is not None:
        group = k // w_mult.shape[1]
        for g in range(w_mult.shape[1]):
            values[:, g * group : (g + 1) * group] *= w_mult[:, g : g + 1].to(torch.int16)
    return values


def quantize_per_tensor_ref(x: torch.Tensor, step: torch.Tensor, bits: int, fmt: str = "int",
                            sinks: torch.Tensor | None = None, sink_bits: int = 8) -> torch.Tensor:
    """codes = clamp(round(float32(x) / step), -2**(bits-1), 2**(bits-1) - 1) as int8 (round half to even);
    for a 4-bit float format, the nearest value of the format (`formats.round_to_format`, the definition).
    Rows marked by `sinks` ([..., 1] bool) take integer codes in sink_bits' range instead."""
    rounded = torch.round(x.to(torch.float32) / step)
    if fmt != formats.INT:
        codes = formats.round_to_format(x.to(torch.float32) / step, fmt, bits)
    else:
        qmax = 2 ** (bits - 1) - 1
        codes = torch.clamp(rounded, -qmax - 1, qmax)
    if sinks is not None:
        smax = 2 ** (sink_bits - 1) - 1
        codes = torch.where(sinks, torch.clamp(rounded, -smax - 1, smax), codes)
    return codes.to(torch.int8)


def token_steps_ref(x: torch.Tensor, bits: int, clip: float = 1.0, fmt: str = "int") -> torch.Tensor:
    """float32 [..., 1]: each row's clip * max|x| / max_value; 1 for a row of zeros."""
    peak = x.to(torch.float32).abs().max(dim=-1, keepdim=True).values * clip
    return torch.where(peak > 0, peak / formats.max_value(fmt, bits), torch.tensor(1.0))


def dequantize_per_tensor_ref(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = (float32(codes) * step).to(dtype)."""
    return (codes.to(torch.float32) * step).to(dtype)


def dequantize_weight_int4_ref(w_packed: torch.Tensor, w_step: torch.Tensor, k: int, dtype: torch.dtype,
                               fmt: str = "int", w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """w[n, k] = (float32(codes[n, k] * w_mult[n, k // group]) * w_step[n]).to(dtype)."""
    return (weight_values_ref(w_packed, k, fmt, w_mult).to(torch.float32) * w_step[:, None]).to(dtype)


def linear_w4a4_ref(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, w_format: str = "int",
                    w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """y = epilogue(x_codes @ values(w).T) with an exact int64 matmul; leading dims of x kept.
    values = codes, times each group's multiplier with `w_mult` (weight_values_ref)."""
    k = x_codes.shape[-1]
    x2 = x_codes.reshape(-1, k).to(torch.int64)
    w = weight_values_ref(w_packed, k, w_format, w_mult).to(torch.int64)
    acc = (x2 @ w.t()).to(torch.int32)
    return epilogue(acc, a_step, w_step, bias, out_dtype).reshape(*x_codes.shape[:-1], w.shape[0])


def grouped_linear_w4a4_ref(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor,
                            a_step: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, w_format: str = "int",
                            w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = linear_w4a4_ref of those rows with expert e's stacked weight rows
    e*N:(e+1)*N; rows past offs[-1] are 0."""
    experts = offs.shape[0]
    n = w_packed.shape[0] // experts
    out = torch.zeros(x_codes.shape[0], n, dtype=out_dtype)
    ends = [int(end) for end in offs]
    for e in range(experts):
        start, end = (ends[e - 1] if e else 0), ends[e]
        w = slice(e * n, (e + 1) * n)
        out[start:end] = linear_w4a4_ref(x_codes[start:end], w_packed[w], w_step[w],
                                         a_step[start:end] if a_step.dim() else a_step, None, out_dtype, w_format,
                                         None if w_mult is None else w_mult[w])
    return out


def fake_quant_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_step: torch.Tensor,
                          w_bits: int = 4, a_bits: int = 4) -> torch.Tensor:
    """The float ("fake-quant") semantics of a W4A4 linear, what the compiled model approximates:

        x_dq = clamp(round(x / a_step), -2**(a_bits-1), 2**(a_bits-1) - 1) * a_step     (per tensor)
        w_dq = codes * w_step[:, None]      (codes, w_step = quantize_weight_per_channel(weight, w_bits))
        y = F.linear(x_dq, w_dq, bias)      in x's dtype
    """
    x_dq = dequantize_per_tensor_ref(quantize_per_tensor_ref(x, a_step, a_bits), a_step, x.dtype)
    codes, w_step = quantize_weight_per_channel(weight, w_bits)
    w_dq = (codes.to(torch.float32) * w_step[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x_dq, w_dq, bias)


def linear_w4a16_ref(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype | None = None, w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """y = (float64(x) @ values(w).T) * w_step + bias, cast to out_dtype (default x's dtype);
    values = int4 codes, times each group's multiplier with `w_mult`."""
    k = x.shape[-1]
    acc = x.reshape(-1, k).double() @ weight_values_ref(w_packed, k, "int", w_mult).double().t()
    out = acc * w_step.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype or x.dtype).reshape(*x.shape[:-1], w_packed.shape[0])


def rms_norm_quantize_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, a_step: torch.Tensor,
                          bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, y): y = float32(x) * rsqrt(mean(x^2) + eps) * weight over the last dim, in x's dtype;
    codes = quantize_per_tensor_ref of the float32 y."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(torch.float32)
    return quantize_per_tensor_ref(y, a_step, bits), y.to(x.dtype)


def layer_norm_quantize_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                            a_step: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, y): y = (x - mean) * rsqrt(var + eps) * weight + bias over the last dim (float32 math)."""
    xf = x.to(torch.float32)
    centered = xf - xf.mean(-1, keepdim=True)
    y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return quantize_per_tensor_ref(y, a_step, bits), y.to(x.dtype)
