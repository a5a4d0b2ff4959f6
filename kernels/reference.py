"""Plain-torch twins of every q4 kernel: the definition of the math, used by tests.

They compute the integer matmul in int64 (exact, and a different route from the kernels'
`torch._int_mm`), and share only `epilogue` with the kernels: the float arithmetic after the
integer accumulation is part of the op's definition, and keeping one copy of it is what makes
kernel == reference bit-exact.
"""

from __future__ import annotations

import torch

from .int4 import quantize_weight_per_channel, unpack_int4


def epilogue(acc: torch.Tensor, a_step: torch.Tensor, w_step: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    """out = acc * (a_step * w_step) + bias, in float32, then cast: the one fused epilogue.

    `acc` is the int32 accumulator [M, N]; its float32 conversion is exact while |acc| < 2**24.
    """
    out = acc.to(torch.float32) * (a_step * w_step)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def quantize_per_tensor_ref(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """codes = clamp(round(x / step), -2**(bits-1), 2**(bits-1) - 1) as int8 (round half to even)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.to(torch.float32) / step), -qmax - 1, qmax).to(torch.int8)


def dequantize_per_tensor_ref(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = codes * step, cast to `dtype`."""
    return (codes.to(torch.float32) * step).to(dtype)


def dequantize_weight_int4_ref(w_packed: torch.Tensor, w_step: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """w[n, k] = codes[n, k] * w_step[n], cast to `dtype`."""
    return (unpack_int4(w_packed, k).to(torch.float32) * w_step[:, None]).to(dtype)


def linear_w4a4_ref(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = epilogue(x_codes @ codes(w).T) with an exact int64 matmul; leading dims of x kept."""
    k = x_codes.shape[-1]
    x2 = x_codes.reshape(-1, k).to(torch.int64)
    w = unpack_int4(w_packed, k).to(torch.int64)
    acc = (x2 @ w.t()).to(torch.int32)
    return epilogue(acc, a_step, w_step, bias, out_dtype).reshape(*x_codes.shape[:-1], w.shape[0])


def fake_quant_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_step: torch.Tensor,
                          w_bits: int = 4, a_bits: int = 4) -> torch.Tensor:
    """The float semantics of a W4A4 linear: quantize x per tensor and w per output channel,
    dequantize both, and run a float linear. What the compiled model approximates."""
    x_dq = dequantize_per_tensor_ref(quantize_per_tensor_ref(x, a_step, a_bits), a_step, x.dtype)
    codes, w_step = quantize_weight_per_channel(weight, w_bits)
    w_dq = (codes.to(torch.float32) * w_step[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x_dq, w_dq, bias)
