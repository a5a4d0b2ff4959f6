"""The `q4::` custom ops: definitions (torch.library), fake implementations, CPU integer kernels.

Each op has a fake implementation, so graphs holding it trace under FakeTensor / make_fx and
pass through Inductor (as an extern kernel). The CPU kernels really compute in integers:
activation codes are int8, weights are unpacked from int4 to int8 inside the call (no unpacked
copy is kept between calls) and multiplied with `torch._int_mm` (int32 accumulation).

    q4::quantize_per_tensor(x, step, bits)            -> int8 codes, same shape as x
    q4::dequantize_per_tensor(codes, step, dtype)     -> codes * step
    q4::dequantize_weight_int4(w_packed, w_step, k, dtype) -> [N, k] codes * w_step[:, None]
    q4::linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype)
                                                      -> (x_codes @ codes(w).T) * (a_step * w_step) + bias

Steps are float32 tensors (0-dim per tensor, [N] per output channel) so they live in the graph
as constants. Every op checks its arguments and names the one that is wrong before computing.
"""

from __future__ import annotations

from typing import Optional

import torch

from .int4 import unpack_int4
from .reference import epilogue


class KernelArgumentError(ValueError):
    """An argument of a q4 op has the wrong dtype, shape or value."""


def _fail(op: str, arg: str, expected: str, got: str) -> None:
    raise KernelArgumentError(f"q4::{op}: argument '{arg}' must be {expected}, got {got}")


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}"


def _check_bits(op: str, bits: int) -> None:
    if not 2 <= bits <= 8:
        _fail(op, "bits", "an integer in 2..8", str(bits))


def _check_step(op: str, arg: str, step: torch.Tensor, shape: tuple | None, check_values: bool) -> None:
    if step.dtype != torch.float32:
        _fail(op, arg, "a float32 tensor", _describe(step))
    if shape is not None and tuple(step.shape) != shape:
        _fail(op, arg, f"of shape {shape}", _describe(step))
    if check_values and not bool(((step > 0) & torch.isfinite(step)).all()):
        _fail(op, arg, "finite and > 0 everywhere", f"values in [{step.min().item()}, {step.max().item()}]")


def _check_packed(op: str, w_packed: torch.Tensor, w_step: torch.Tensor, k: int, check_values: bool) -> None:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        _fail(op, "w_packed", "a 2-D uint8 tensor [N, ceil(K/2)]", _describe(w_packed))
    if w_packed.shape[1] != (k + 1) // 2:
        _fail(op, "w_packed", f"{(k + 1) // 2} bytes a row for K={k}", f"{w_packed.shape[1]} ({_describe(w_packed)})")
    _check_step(op, "w_step", w_step, (w_packed.shape[0],), check_values)


def _check_float_dtype(op: str, arg: str, dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(op, arg, "float32, float16 or bfloat16", str(dtype))


# --- quantize_per_tensor ---------------------------------------------------------------------------


@torch.library.custom_op("q4::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric per-tensor quantize: clamp(round(x / step), -2**(bits-1), 2**(bits-1)-1)."""
    _check_quantize(x, step, bits, check_values=True)
    qmax = 2 ** (bits - 1) - 1
    scaled = x.to(torch.float32) / step  # a new tensor: the in-place ops below do not touch x
    return scaled.round_().clamp_(-qmax - 1, qmax).to(torch.int8)


def _check_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, check_values: bool) -> None:
    if not x.is_floating_point():
        _fail("quantize_per_tensor", "x", "a floating-point tensor", _describe(x))
    _check_step("quantize_per_tensor", "step", step, (), check_values)
    _check_bits("quantize_per_tensor", bits)


@quantize_per_tensor.register_fake
def _(x, step, bits):
    _check_quantize(x, step, bits, check_values=False)
    return torch.empty_like(x, dtype=torch.int8)


# --- dequantize_per_tensor -------------------------------------------------------------------------


@torch.library.custom_op("q4::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = codes * step, in `dtype`."""
    _check_dequantize(codes, step, dtype, check_values=True)
    return (codes.to(torch.float32) * step).to(dtype)


def _check_dequantize(codes, step, dtype, check_values: bool) -> None:
    if codes.dtype != torch.int8:
        _fail("dequantize_per_tensor", "codes", "an int8 tensor", _describe(codes))
    _check_step("dequantize_per_tensor", "step", step, (), check_values)
    _check_float_dtype("dequantize_per_tensor", "dtype", dtype)


@dequantize_per_tensor.register_fake
def _(codes, step, dtype):
    _check_dequantize(codes, step, dtype, check_values=False)
    return torch.empty_like(codes, dtype=dtype)


# --- dequantize_weight_int4 ------------------------------------------------------------------------


@torch.library.custom_op("q4::dequantize_weight_int4", mutates_args=())
def dequantize_weight_int4(w_packed: torch.Tensor, w_step: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """w[n, k] = codes[n, k] * w_step[n], in `dtype` (the fake-quant form of a packed weight)."""
    _check_packed("dequantize_weight_int4", w_packed, w_step, k, check_values=True)
    _check_float_dtype("dequantize_weight_int4", "dtype", dtype)
    return (unpack_int4(w_packed, k).to(torch.float32) * w_step[:, None]).to(dtype)


@dequantize_weight_int4.register_fake
def _(w_packed, w_step, k, dtype):
    _check_packed("dequantize_weight_int4", w_packed, w_step, k, check_values=False)
    return w_packed.new_empty((w_packed.shape[0], k), dtype=dtype)


# --- linear_w4a4 ---------------------------------------------------------------------------------


def _check_linear(x_codes, w_packed, w_step, a_step, bias, out_dtype, check_values: bool) -> None:
    op = "linear_w4a4"
    if x_codes.dtype != torch.int8 or x_codes.dim() < 1:
        _fail(op, "x_codes", "an int8 tensor [..., K] of int4 codes", _describe(x_codes))
    _check_packed(op, w_packed, w_step, x_codes.shape[-1], check_values)
    _check_step(op, "a_step", a_step, (), check_values)
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (w_packed.shape[0],)):
        _fail(op, "bias", f"None or a float tensor of shape ({w_packed.shape[0]},)", _describe(bias))
    _check_float_dtype(op, "out_dtype", out_dtype)


@torch.library.custom_op("q4::linear_w4a4", mutates_args=())
def linear_w4a4(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """y = (x_codes @ codes(w).T) * (a_step * w_step) + bias: int4 x int4, int32 accumulation.

    x_codes int8 [..., K] (values in [-8, 7]); w_packed uint8 [N, ceil(K/2)]; w_step float32 [N];
    a_step float32 0-dim; bias float [N] or None; result [..., N] in out_dtype.
    """
    _check_linear(x_codes, w_packed, w_step, a_step, bias, out_dtype, check_values=True)
    k = x_codes.shape[-1]
    x2 = x_codes.reshape(-1, k)
    # _int_mm takes mat2 as [K, N]; the transposed view of the row-major unpacked weight is the
    # column-major layout its oneDNN kernel reads directly (no transpose copy).
    acc = torch._int_mm(x2.contiguous(), unpack_int4(w_packed, k).t())
    return epilogue(acc, a_step, w_step, bias, out_dtype).reshape(*x_codes.shape[:-1], w_packed.shape[0])


@linear_w4a4.register_fake
def _(x_codes, w_packed, w_step, a_step, bias, out_dtype):
    _check_linear(x_codes, w_packed, w_step, a_step, bias, out_dtype, check_values=False)
    return x_codes.new_empty((*x_codes.shape[:-1], w_packed.shape[0]), dtype=out_dtype)
