"""The `q4::` custom ops: definitions (torch.library), fake implementations, CPU integer kernels.

Each op has a fake implementation, so graphs holding it trace under FakeTensor / make_fx and
pass through Inductor (as a fallback kernel). The CPU kernels really compute in integers:
activation codes are int8, weights are unpacked from int4 to int8 inside the call (no unpacked
copy is kept between calls) and multiplied with `torch._int_mm` (int32 accumulation).

CPU `torch._int_mm` (torch 2.11 - 2.13) takes any M, K, N (M = 1, odd K and N included, no
padding needed) and any strides, int8 x int8 -> int32. It is fast only through oneDNN, which
it uses when `torch.backends.mkldnn.enabled` and the CPU has AVX512-VNNI; otherwise it runs a
scalar triple loop (~100x slower). There, and on other devices, `int_matmul` multiplies the
codes in float32 instead: exact, hence bit-identical, while |acc| < 2**24 (int4 x int4: any
K < 262144), the same bound under which the epilogue's float32(acc) is exact.

    q4::token_steps(x, bits, clip=1.0, format="int")  -> float32 [..., 1]: each row's step (dynamic)
    q4::quantize_per_tensor(x, step, bits, format="int", sinks=None, sink_bits=8)
                                                      -> int8 codes, same shape as x
    q4::dequantize_per_tensor(codes, step, dtype)     -> codes * step
    q4::dequantize_weight_int4(w_packed, w_step, k, dtype, format="int", w_mult=None)
                                                      -> [N, k] values(w) * w_step[:, None]
    q4::linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format="int", w_mult=None)
                                                      -> (x_codes @ values(w).T) * (a_step * w_step) + bias
    q4::linear_w4a16(x, w_packed, w_step, bias, out_dtype, w_mult=None)
                                                      -> F.linear(x, values(w) * w_step[:, None], bias)
    q4::grouped_linear_w4a4(x_codes, w_packed, w_step, a_step, offs, out_dtype, w_format="int", w_mult=None)
                                                      -> a mixture of experts' grouped GEMM: rows
                                                         offs[e-1]:offs[e] through expert e's linear_w4a4

A weight's values are its codes, or with group multipliers `w_mult` (uint8 [N, K / group],
formats.py) its codes times their group's multiplier: integers that still fit int8, so every
integer path below stays exact and the epilogue per output channel stays as it is.

At decode (M <= cpu_kernels.SMALL_M rows; W4A16: SMALL_M_W4A16) the CPU kernels call the
q4_cpu C++ ops instead (qcompile/kernels/cpu_kernels.py), which read the packed weight directly: same
values (linear_w4a4 bit for bit), no unpacked copy of the weight at all.

Codes are integer values in a number format (`formats.py`): `int` (two's complement, the default)
or a 4-bit float of LLM-FP4 (`e2m1`, `e3m0`, `e1m2`), whose values are small integers too, so
the same integer kernels compute FP4 linears exactly: a 4-bit weight's nibble is decoded by its
format's table (q4_cpu: a byte shuffle).

Steps are float32 tensors (0-dim per tensor, [N] per output channel) so they live in the graph
as constants. An activation step may also be one per row (token), [..., 1] (x's leading dims):
computed at run time by `q4::token_steps` (dynamic quantization, the reference of static); the
quantize, the dequantize and the linear take either, the linear's epilogue then multiplying by
a_step[m] * w_step[n]. Every op checks its arguments and names the one that is wrong before computing.

Attention sinks: the first token of a sequence carries activations hundreds of times larger
than the others' (SmolLM2's down_proj inputs: 3210 against at most 17 for the rest), which one
static step per tensor cannot hold. The quantize takes a bool `sinks` [..., 1] and a per-row
step: the rows it marks get `sink_bits` (8) codes, the rest `bits`; the step per row (static:
`where(sinks, sink_step, step)`, built in the graph) goes to the linear's epilogue as a dynamic
one does. `insert-quantizers{sinks=true}` makes this form.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cpu_kernels, formats
from .checks import (
    KernelArgumentError,  # noqa: F401  (the error the ops raise, importable from here)
    activation_step_shape,
    check_bias,
    check_device,
    check_float_dtype,
    check_multipliers,
    check_packed,
    check_step,
    describe,
    fail,
)
from .reference import epilogue


def _cpu_int_mm_is_fast() -> bool:
    """Whether CPU `torch._int_mm` takes its oneDNN path (see the module docstring)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)  # private; assume yes if it moved
    return bool(is_vnni()) if is_vnni is not None else True


def int_matmul(x: torch.Tensor, w: torch.Tensor, w_bound: int = 8) -> torch.Tensor:
    """int32 [M, N] = x [M, K] @ w[N, K].T for int8 x and w, |w| <= w_bound (8: 4-bit codes)."""
    if x.device.type == "cpu" and _cpu_int_mm_is_fast():
        # _int_mm takes mat2 as [K, N]; the transposed view of the row-major weight is the
        # column-major layout oneDNN reads directly (measured as fast as a contiguous [K, N]).
        return torch._int_mm(x, w.t())
    # a float sum of integers is exact while every partial sum stays below 2**24 (any order)
    exact = torch.float32 if x.shape[-1] * 128 * w_bound < 2**24 else torch.float64
    return torch.mm(x.to(exact), w.to(exact).t()).to(torch.int32)


def weight_values(w_packed: torch.Tensor, k: int, fmt: str, w_mult: Optional[torch.Tensor]) -> torch.Tensor:
    """int8 [N, k]: the integers the kernels multiply, value(code) * w_mult of its group (formats.py)."""
    return formats.apply_multipliers(formats.unpack(w_packed, k, fmt), w_mult)


# --- quantize_per_tensor ---------------------------------------------------------------------------


def check_format(op: str, arg: str, fmt: str, bits: int = 4) -> None:
    if fmt not in formats.FORMATS:
        fail(op, arg, f"one of {', '.join(formats.FORMATS)}", repr(fmt))
    if fmt != formats.INT and bits != 4:
        fail(op, "bits", f"4 for the 4-bit float format {fmt!r}", repr(bits))


def _check_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, fmt: str, sinks: Optional[torch.Tensor],
                    sink_bits: int, check_values: bool) -> None:
    op = "quantize_per_tensor"
    if not x.is_floating_point():
        fail(op, "x", "a floating-point tensor", describe(x))
    check_step(op, "step", step, activation_step_shape(x, step), check_values)
    check_device(op, x, step=step, sinks=sinks)
    if not 2 <= bits <= 8:
        fail(op, "bits", "an int in 2..8", repr(bits))
    check_format(op, "format", fmt, bits)
    if sinks is not None:
        rows = (*x.shape[:-1], 1)
        if sinks.dtype != torch.bool or tuple(sinks.shape) != rows:
            fail(op, "sinks", f"None or a bool tensor of shape {rows} (x's rows)", describe(sinks))
        if step.dim() == 0:
            fail(op, "step", "one step per row [..., 1] when sinks are given (where(sinks, sink_step, step))",
                 describe(step))
        if not bits <= sink_bits <= 8:
            fail(op, "sink_bits", f"an int in {bits}..8", repr(sink_bits))


def quantize_math(x: torch.Tensor, step: torch.Tensor, bits: int, format: str = "int",
                  sinks: Optional[torch.Tensor] = None, sink_bits: int = 8) -> torch.Tensor:
    """The op's computation in ATen ops (also its Inductor lowering)."""
    v = x.to(torch.float32) / step
    codes = formats.round_to_format(v, format, bits)
    if sinks is not None:  # the marked rows: integer codes of sink_bits, whatever the others' format
        codes = torch.where(sinks, formats.round_to_format(v, formats.INT, sink_bits), codes)
    return codes.to(torch.int8)


@torch.library.custom_op("q4::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, step: torch.Tensor, bits: int, format: str = "int",
                        sinks: Optional[torch.Tensor] = None, sink_bits: int = 8) -> torch.Tensor:
    """Per-tensor (or per-row) quantize, int8 codes of x's shape: the value of the format nearest
    to float32(x) / step (`formats.round_to_format`: ties to even, saturating). For `int`:

        codes = clamp(round(float32(x) / step), -2**(bits-1), 2**(bits-1) - 1)

    step is a 0-dim float32 tensor (or one per row, [..., 1]: see `token_steps`), finite and > 0;
    bits in 2..8 (4 for a float format). With `sinks` (bool [..., 1], x's rows, and a step per
    row), the rows it marks take integer codes of `sink_bits` instead (the attention sinks, see the
    module docstring); the integer kernels multiply either kind of code.
    """
    _check_quantize(x, step, bits, format, sinks, sink_bits, check_values=True)
    return quantize_math(x, step, bits, format, sinks, sink_bits)


@quantize_per_tensor.register_fake
def _(x, step, bits, format="int", sinks=None, sink_bits=8):
    _check_quantize(x, step, bits, format, sinks, sink_bits, check_values=False)
    return torch.empty_like(x, dtype=torch.int8)


# --- token_steps -----------------------------------------------------------------------------------


def _check_token_steps(x: torch.Tensor, bits: int, clip: float, fmt: str) -> None:
    op = "token_steps"
    if not x.is_floating_point() or x.dim() < 1:
        fail(op, "x", "a floating-point tensor [..., K]", describe(x))
    if not 2 <= bits <= 8:
        fail(op, "bits", "an int in 2..8", repr(bits))
    if not 0 < clip <= 1:
        fail(op, "clip", "a ratio in (0, 1]", repr(clip))
    check_format(op, "format", fmt, bits)


def token_steps_math(x: torch.Tensor, bits: int, clip: float = 1.0, format: str = "int") -> torch.Tensor:
    """The op's computation in ATen ops (also its Inductor lowering): per row,
    clip * max|float32(x)| / max_value, and 1 for a row of zeros (its codes are 0)."""
    peak = x.to(torch.float32).abs().amax(dim=-1, keepdim=True) * clip
    step = peak / formats.max_value(format, bits)
    return torch.where(peak > 0, step, torch.ones_like(step))


@torch.library.custom_op("q4::token_steps", mutates_args=())
def token_steps(x: torch.Tensor, bits: int, clip: float = 1.0, format: str = "int") -> torch.Tensor:
    """Dynamic activation steps, float32 [..., 1]: each row's (token's) clip * absmax / max_value
    of the format (qmax for int), computed at run time; 1 where a row is all zeros. The reference
    static quantization is measured against: no calibration range, a step per token."""
    _check_token_steps(x, bits, clip, format)
    return token_steps_math(x, bits, clip, format)


@token_steps.register_fake
def _(x, bits, clip=1.0, format="int"):
    _check_token_steps(x, bits, clip, format)
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# --- dequantize_per_tensor -------------------------------------------------------------------------


def _check_dequantize(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype, check_values: bool) -> None:
    op = "dequantize_per_tensor"
    if codes.dtype != torch.int8:
        fail(op, "codes", "an int8 tensor", describe(codes))
    check_step(op, "step", step, activation_step_shape(codes, step), check_values)
    check_device(op, codes, step=step)
    check_float_dtype(op, "dtype", dtype)


@torch.library.custom_op("q4::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x = (float32(codes) * step).to(dtype), codes' shape; step 0-dim float32, finite and > 0."""
    _check_dequantize(codes, step, dtype, check_values=True)
    return (codes.to(torch.float32) * step).to(dtype)


@dequantize_per_tensor.register_fake
def _(codes, step, dtype):
    _check_dequantize(codes, step, dtype, check_values=False)
    return torch.empty_like(codes, dtype=dtype)


# --- dequantize_weight_int4 ------------------------------------------------------------------------


def _check_dequantize_weight(w_packed, w_step, k, dtype, fmt, w_mult, check_values: bool) -> None:
    op = "dequantize_weight_int4"
    if k < 0:
        fail(op, "k", "an int >= 0 (the weight's K)", repr(k))
    check_packed(op, w_packed, w_step, k, "argument 'k'", check_values)
    check_float_dtype(op, "dtype", dtype)
    check_format(op, "format", fmt)
    check_multipliers(op, w_mult, w_packed, k, fmt, check_values)


@torch.library.custom_op("q4::dequantize_weight_int4", mutates_args=())
def dequantize_weight_int4(w_packed: torch.Tensor, w_step: torch.Tensor, k: int, dtype: torch.dtype,
                           format: str = "int", w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fake-quant form of a packed 4-bit weight, [N, k] in `dtype`:

        w[n, j] = (float32(values[n, j]) * w_step[n]).to(dtype),   values = weight_values(w_packed, k, format, w_mult)

    (codes = formats.unpack(w_packed, k, format), times their group's multiplier with w_mult).
    """
    _check_dequantize_weight(w_packed, w_step, k, dtype, format, w_mult, check_values=True)
    return (weight_values(w_packed, k, format, w_mult).to(torch.float32) * w_step[:, None]).to(dtype)


@dequantize_weight_int4.register_fake
def _(w_packed, w_step, k, dtype, format="int", w_mult=None):
    _check_dequantize_weight(w_packed, w_step, k, dtype, format, w_mult, check_values=False)
    return w_packed.new_empty((w_packed.shape[0], k), dtype=dtype)


# --- linear_w4a4 -----------------------------------------------------------------------------------


def _check_linear(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format, w_mult, check_values: bool) -> None:
    op = "linear_w4a4"
    check_format(op, "w_format", w_format)
    if x_codes.dtype != torch.int8 or x_codes.dim() < 1:
        fail(op, "x_codes", "an int8 tensor [..., K] of activation codes", describe(x_codes))
    check_packed(op, w_packed, w_step, x_codes.shape[-1], "x_codes.shape[-1]", check_values)
    check_multipliers(op, w_mult, w_packed, x_codes.shape[-1], w_format, check_values)
    check_step(op, "a_step", a_step, activation_step_shape(x_codes, a_step), check_values)
    n = w_packed.shape[0]
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        fail(op, "bias", f"None or a float tensor of shape ({n},)", describe(bias))
    check_device(op, x_codes, w_packed=w_packed, a_step=a_step, bias=bias)
    check_float_dtype(op, "out_dtype", out_dtype)


@torch.library.custom_op("q4::linear_w4a4", mutates_args=())
def linear_w4a4(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype, w_format: str = "int",
                w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer linear on codes, [..., N] in out_dtype:

        acc[m, n] = sum_k x_codes[m, k] * values(w)[n, k]             (exact, int32)
        y[m, n] = (float32(acc[m, n]) * (a_step * w_step[n]) + float32(bias[n])).to(out_dtype)

    x_codes int8 [..., K] (int4 codes in [-8, 7], FP4 values; any int8 is computed exactly);
    w_packed uint8 [N, ceil(K/2)] of 4-bit codes in `w_format` (formats.pack); w_step float32 [N]
    and a_step 0-dim float32 (or one per row, [..., 1]: a_step[m] * w_step[n] in the epilogue),
    finite and > 0; bias float [N] or None; w_mult None or uint8 [N, K / group] (formats.py:
    values = codes * their group's multiplier). Leading dims of x_codes are kept, M = prod(leading)
    may be 0 or 1.
    """
    _check_linear(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format, w_mult, check_values=True)
    # decode: read the packed weight
    if x_codes.device.type == "cpu" and cpu_kernels.use_for(_rows(x_codes), cpu_kernels.SMALL_M):
        return torch.ops.q4_cpu.linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype,
                                            cpu_kernels.FORCE_SCALAR, nibble_table(w_format), w_mult)
    k, n = x_codes.shape[-1], w_packed.shape[0]
    x = x_codes.reshape(-1, k)

    def columns(rows: slice) -> torch.Tensor:
        values = weight_values(w_packed[rows], k, w_format, None if w_mult is None else w_mult[rows])
        acc = int_matmul(x, values, weight_bound(w_mult))
        return epilogue(acc, a_step, w_step[rows], None if bias is None else bias[rows], out_dtype)

    # A block of output columns at a time (each column's integers and epilogue are its own: the
    # same bits), so that a large linear (a 49152-row head at 512 tokens) never holds its whole
    # unpacked weight, int32 accumulator and float copy at once, only the output.
    block = max(1, OUTPUT_BLOCK // max(1, x.shape[0]))
    if n <= block:
        y = columns(slice(None))
    else:
        y = x.new_empty((x.shape[0], n), dtype=out_dtype)
        for start in range(0, n, block):
            y[:, start:start + block] = columns(slice(start, start + block))
    return y.reshape(*x_codes.shape[:-1], n)


OUTPUT_BLOCK = 2**21  # int32 accumulator elements linear_w4a4 computes at a time (8 MiB)


def nibble_table(fmt: str) -> Optional[list[int]]:
    """The q4_cpu kernel's `w_values` for a weight format: None for int4 (its default), else the table."""
    return None if fmt == formats.INT else list(formats.nibble_values(fmt))


def weight_bound(w_mult: Optional[torch.Tensor]) -> int:
    """The largest |value| a weight's integers may reach (int_matmul's exactness bound)."""
    return 8 if w_mult is None else 127


@linear_w4a4.register_fake
def _linear_w4a4_fake(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format="int", w_mult=None):
    _check_linear(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format, w_mult, check_values=False)
    return x_codes.new_empty((*x_codes.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


def _rows(x: torch.Tensor):
    """M = the product of x's leading dims (a SymInt under dynamic shapes)."""
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return m


# --- linear_w4a16 ----------------------------------------------------------------------------------


def _check_linear_w4a16(x, w_packed, w_step, bias, out_dtype, w_mult, check_values: bool) -> None:
    op = "linear_w4a16"
    if not x.is_floating_point() or x.dim() < 1:
        fail(op, "x", "a float tensor [..., K]", describe(x))
    check_packed(op, w_packed, w_step, x.shape[-1], "x.shape[-1]", check_values)
    check_multipliers(op, w_mult, w_packed, x.shape[-1], formats.INT, check_values)
    check_bias(op, bias, w_packed.shape[0])
    check_device(op, x, w_packed=w_packed, bias=bias)
    check_float_dtype(op, "out_dtype", out_dtype)


def linear_w4a16_dequantized(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor,
                             bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                             w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight-only linear as its unfused form computes it: dequantize in x's dtype, F.linear."""
    values = weight_values(w_packed, x.shape[-1], formats.INT, w_mult)
    w = (values.to(torch.float32) * w_step[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias).to(out_dtype)


@torch.library.custom_op("q4::linear_w4a16", mutates_args=())
def linear_w4a16(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, bias: Optional[torch.Tensor],
                 out_dtype: torch.dtype, w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only linear (float activations, packed int4 weight), [..., N] in out_dtype:

        y = F.linear(x, values(w) * w_step[:, None], bias)     (values: codes, times w_mult's groups)

    x float [..., K]; w_packed uint8 [N, ceil(K/2)]; w_step float32 [N], finite and > 0; bias
    float [N] or None. On CPU at M <= cpu_kernels.SMALL_M_W4A16 the q4_cpu kernel computes it in
    float32 from the packed bytes: (sum_k float32(x) * code) * w_step + bias, cast to out_dtype.
    Otherwise the weight is dequantized to x's dtype and multiplied with F.linear (the values of
    the unfused aten.linear(x, q4.dequantize_weight_int4(...), bias) it replaces). On CUDA the
    Triton W4A16 GEMM computes it from the packed bytes with float32 accumulation (the same
    values up to rounding).
    """
    _check_linear_w4a16(x, w_packed, w_step, bias, out_dtype, w_mult, check_values=True)
    if x.device.type == "cpu" and cpu_kernels.use_for(_rows(x), cpu_kernels.SMALL_M_W4A16):
        return torch.ops.q4_cpu.linear_w4a16(x, w_packed, w_step, bias, out_dtype, cpu_kernels.FORCE_SCALAR, w_mult)
    return linear_w4a16_dequantized(x, w_packed, w_step, bias, out_dtype, w_mult)


@linear_w4a16.register_fake
def _(x, w_packed, w_step, bias, out_dtype, w_mult=None):
    _check_linear_w4a16(x, w_packed, w_step, bias, out_dtype, w_mult, check_values=False)
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


# --- grouped_linear_w4a4 (a mixture of experts' grouped GEMM) -------------------------------------


def _check_grouped_linear(x_codes, w_packed, w_step, a_step, offs, out_dtype, w_format, w_mult,
                          check_values: bool) -> None:
    op = "grouped_linear_w4a4"
    check_format(op, "w_format", w_format)
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2:
        fail(op, "x_codes", "an int8 tensor [S, K] of activation codes, its rows sorted by expert", describe(x_codes))
    if offs.dim() != 1 or offs.dtype not in (torch.int32, torch.int64) or offs.shape[0] < 1:
        fail(op, "offs", "an int32 or int64 tensor [E] of the experts' cumulative row counts", describe(offs))
    experts = offs.shape[0]
    if w_packed.dim() != 2 or w_packed.shape[0] % experts:
        fail(op, "w_packed", f"a 2-D uint8 tensor [E * N, ceil(K/2)] of the {experts} experts' stacked rows",
             describe(w_packed))
    check_packed(op, w_packed, w_step, x_codes.shape[-1], "x_codes.shape[-1]", check_values)
    check_multipliers(op, w_mult, w_packed, x_codes.shape[-1], w_format, check_values)
    check_step(op, "a_step", a_step, activation_step_shape(x_codes, a_step), check_values)
    check_device(op, x_codes, w_packed=w_packed, a_step=a_step, offs=offs)
    check_float_dtype(op, "out_dtype", out_dtype)
    if check_values and experts:
        bounds = offs.tolist()
        if any(b < a for a, b in zip([0, *bounds], bounds)) or bounds[-1] > x_codes.shape[0]:
            fail(op, "offs", f"non-decreasing, from 0 up to at most S = {x_codes.shape[0]}", str(bounds))


@torch.library.custom_op("q4::grouped_linear_w4a4", mutates_args=())
def grouped_linear_w4a4(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                        offs: torch.Tensor, out_dtype: torch.dtype, w_format: str = "int",
                        w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A mixture of experts' grouped integer linear, [S, N] in out_dtype. The E experts' weights
    are stacked along the output rows (expert e: rows e*N:(e+1)*N of w_packed, w_step, w_mult),
    the activation rows are sorted by expert, and offs[e] is the end of expert e's rows:

        rows(e) = offs[e-1]:offs[e]          (offs[-1] := 0; an expert may have no rows)
        y[rows(e)] = linear_w4a4(x_codes[rows(e)], w_packed[e*N:(e+1)*N], w_step[e*N:(e+1)*N], a_step,
                                 None, out_dtype, w_format, w_mult[e*N:(e+1)*N])
        y[offs[E-1]:] = 0                    (rows no expert takes)

    so each expert's rows are exact int32 sums as in linear_w4a4, with its epilogue
    acc * (a_step * w_step[n]). x_codes int8 [S, K]; w_packed uint8 [E * N, ceil(K/2)]; w_step
    float32 [E * N]; a_step 0-dim float32 (or one per row, [S, 1]); offs int32/int64 [E],
    non-decreasing, at most S (what transformers' grouped_mm_experts_forward passes its grouped
    GEMMs). No bias: transformers adds an expert's bias after the grouped GEMM.
    """
    _check_grouped_linear(x_codes, w_packed, w_step, a_step, offs, out_dtype, w_format, w_mult, check_values=True)
    n = w_packed.shape[0] // offs.shape[0]
    out = x_codes.new_zeros((x_codes.shape[0], n), dtype=out_dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host read of the offsets, as transformers' own fallback
        if end > start:
            rows, experts_rows = slice(start, end), slice(e * n, (e + 1) * n)
            out[rows] = linear_w4a4(x_codes[rows], w_packed[experts_rows], w_step[experts_rows],
                                    a_step[rows] if a_step.dim() else a_step, None, out_dtype, w_format,
                                    None if w_mult is None else w_mult[experts_rows])
        start = end
    return out


@grouped_linear_w4a4.register_fake
def _(x_codes, w_packed, w_step, a_step, offs, out_dtype, w_format="int", w_mult=None):
    _check_grouped_linear(x_codes, w_packed, w_step, a_step, offs, out_dtype, w_format, w_mult, check_values=False)
    return x_codes.new_empty((x_codes.shape[0], w_packed.shape[0] // offs.shape[0]), dtype=out_dtype)


# --- the Triton route ------------------------------------------------------------------------------


def _triton_gemm():
    """kernels.triton_gemm, imported on first use: importing triton costs a second, and whether
    its kernels are interpreted is fixed when they are defined (TRITON_INTERPRET at import)."""
    from . import triton_gemm

    return triton_gemm


@linear_w4a4.register_kernel("cuda")
def _(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format="int", w_mult=None):
    # no per-call read of the steps' values: a GPU sync, and illegal under CUDA-graph capture
    # (mode="reduce-overhead"); the passes checked these constants when they made them
    return _triton_gemm().linear_w4a4(x_codes.contiguous(), w_packed, w_step, a_step, bias, out_dtype,
                                      w_format, check_values=False, w_mult=w_mult)


def _runs_on(x: torch.Tensor, op: str, kernels):
    """`kernels` (a module of Triton kernels), which CPU tensors reach only in Triton's interpreter."""
    if x.device.type == "cpu" and not kernels.INTERPRET:
        raise RuntimeError(f"q4::{op}: CPU tensors need Triton's interpreter, but the kernels were compiled "
                           "for a GPU in this process (set TRITON_INTERPRET=1 before the first q4 compile)")
    return kernels


@torch.library.custom_op("q4::linear_w4a4_triton", mutates_args=())
def linear_w4a4_triton(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                       bias: Optional[torch.Tensor], out_dtype: torch.dtype, w_format: str = "int",
                       w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`q4::linear_w4a4` through the Triton kernel on any device (on CPU: Triton's interpreter).
    The lowering puts it in place of linear_w4a4 with the `kernels="triton"` option (Q4_KERNELS)."""
    gemm = _runs_on(x_codes, "linear_w4a4_triton", _triton_gemm())
    return gemm.linear_w4a4(x_codes.contiguous(), w_packed, w_step, a_step, bias, out_dtype, w_format,
                            check_values=x_codes.device.type == "cpu", w_mult=w_mult)


linear_w4a4_triton.register_fake(_linear_w4a4_fake)  # the same op, another kernel


@linear_w4a16.register_kernel("cuda")
def _(x, w_packed, w_step, bias, out_dtype, w_mult=None):
    # the Triton GEMM from the packed bytes (not a dequantized copy of the weight at every call), and
    # no read of the steps' values (a sync, illegal under CUDA-graph capture): graph constants, checked when made
    return _triton_gemm().linear_w4a16(x.contiguous(), w_packed, w_step, bias, out_dtype, check_values=False,
                                       w_mult=w_mult)


def _triton_tiled_gemm():
    """kernels.triton_tiled_gemm, imported on first use (as `_triton_gemm`)."""
    from . import triton_tiled_gemm

    return triton_tiled_gemm


@torch.library.custom_op("q4::linear_w4a4_tiled", mutates_args=())
def linear_w4a4_tiled(x_codes: torch.Tensor, w_tiled: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                      bias: Optional[torch.Tensor], out_dtype: torch.dtype, w_format: str = "int",
                      w_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`q4::linear_w4a4` of a weight in the tiled GPU layout (`gpu_layout.to_tiled`: uint8 [K/2, N]),
    through the tuned Triton kernel (`triton_tiled_gemm.py`): the same values. The lowering puts
    it in place of linear_w4a4 for the weights the layout covers, when the GEMMs run in Triton
    (on CUDA, or with kernels="triton" in the interpreter on CPU)."""
    tiled = _runs_on(x_codes, "linear_w4a4_tiled", _triton_tiled_gemm())
    # on CUDA no per-call read of the steps' values (a sync, illegal under CUDA-graph capture): the
    # passes checked these constants when they made them
    return tiled.linear_w4a4_tiled(x_codes.contiguous(), w_tiled, w_step, a_step, bias, out_dtype, w_format,
                                   check_values=x_codes.device.type == "cpu", w_mult=w_mult)


@linear_w4a4_tiled.register_fake
def _(x_codes, w_tiled, w_step, a_step, bias, out_dtype, w_format="int", w_mult=None):
    if w_tiled.dim() != 2 or 2 * w_tiled.shape[0] != x_codes.shape[-1]:
        fail("linear_w4a4_tiled", "w_tiled", f"a tensor [K/2, N] for K = {x_codes.shape[-1]} (x_codes.shape[-1])",
             describe(w_tiled))
    return x_codes.new_empty((*x_codes.shape[:-1], w_tiled.shape[1]), dtype=out_dtype)
