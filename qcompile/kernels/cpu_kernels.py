"""CPU kernels: decode linears over packed int4 weights, the Walsh-Hadamard transform of the
activation rotations and a batch-invariant attention; the `q4_cpu::` ops, a C++ extension built
on first use.

Why: at decode (M = 1..16 rows) a linear is bound by reading its weight. The `q4::linear_w4a4`
CPU path unpacks the whole int4 weight to int8 every call (twice the bytes, written and read
again) before `torch._int_mm`; these kernels read the packed bytes once, straight into the dot
products.

    torch.ops.q4_cpu.linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype, force_scalar=False,
                                 w_values=None, w_mult=None)
        the same values as `q4::linear_w4a4`, bit for bit (int32 accumulation, then the epilogue of
        reference.epilogue in the same float32 order); `w_values` is the weight format's nibble
        table (formats.nibble_values: None is int4's), so FP4 weights run here too; `w_mult` the
        weight's group multipliers (uint8 [N, K / group], formats.py): value * w_mult[n, k // group]
    torch.ops.q4_cpu.linear_w4a16(x, w_packed, w_step, bias, out_dtype, force_scalar=False, w_mult=None)
        F.linear(x, dequantized weight) in float32 (up to summation order): sum_k x * code (times
        its group's multiplier with `w_mult`), then * w_step[n] + bias[n]
    torch.ops.q4_cpu.hadamard(x, n, force_scalar=False)
        float32 x [..., K] with every block of n (a power of two) consecutive values multiplied by
        the normalized Sylvester-Hadamard matrix: a fast Walsh-Hadamard transform, the power-of-two
        part of an activation rotation (qcompile/kernels/rotation.py)
    torch.ops.q4_cpu.kron_factor(x, factor, inner, force_scalar=False)
        float32 x [..., K] viewed as [rows, d, inner], multiplied along its d axis by factor [d, d]:
        one learned Kronecker factor of a rotation (rotate-inputs{learn-steps}), summed in a fixed
        order, so each row gets the same bits at any number of rows
    torch.ops.q4_cpu.attention(query, key, value, attn_mask=None, is_causal=False, scale=None, force_scalar=False)
        float32 softmax(q k^T * scale + mask) v over [batch, heads, length, dim] (key and value
        heads may divide the query's: grouped queries), like ATen's scaled_dot_product_attention
        up to float rounding, but batch-invariant: each output row goes through the same float
        operations whatever the query count, key count past its allowed ones, or batch, so a
        decode step at position i gives the bits of row i of the prompt. The Inductor lowering
        uses it on CPU (qcompile/backends/lowering.py). Fixed summation orders and an exp polynomial of
        its own, in csrc/q4_cpu.cpp. At SmolLM2's shapes (2 threads, 9 query heads, 3 key/value
        heads, 64 dims) it is faster than ATen's flash attention: 512 causal tokens in 3.1
        against 4.6 ms, 1 decode query against 600 keys in 0.033 against 0.064 ms.

Layout and the VNNI trick (csrc/q4_cpu.cpp): the packed weight is uint8 [N, ceil(K/2)], the low
nibble of byte j holds code k=2j, the high nibble k=2j+1 (int4.py). `vpdpbusd` multiplies
unsigned bytes by signed ones: the nibbles, split with an and / a shift, are looked up by a byte
shuffle in the format's table shifted to be unsigned (value + offset, offset 8 for int4, 12 for
E2M1, 64 for E3M0), and multiplied against the activation codes de-interleaved once per call
into even-k and odd-k int8 vectors (zero padded to 64 bytes); the dot product is the sum minus
offset * sum(x) of the row. A tile of 4 weight columns is unpacked once per K step for up to 4
activation rows in registers, so the weight is read from memory once per call for any M. The
W4A16 kernel sign-extends the nibbles to float32 and uses FMA. With group multipliers each
128-bit lane of a K step (32 codes, one group) looks its nibbles up in the shifted table times
the group's multiplier (one 16-bit multiply a column and K step, for all the rows), and the
accumulators start at -offset * sum_g multiplier * (sum of x over group g) instead of ending
minus offset * sum(x); W4A16 multiplies the float codes by the multiplier. At SmolLM2's shapes
(2 threads) that costs 1.3x at M = 1 (+2.6 µs a linear) and nothing at M = 16.

Dispatch: the AVX512-VNNI code is compiled with target attributes and chosen at run time
(`__builtin_cpu_supports`); a portable scalar loop runs elsewhere, or when forced (the op's
`force_scalar` argument; Q4_CPU_KERNELS=scalar sets `FORCE_SCALAR`, the value the q4 ops and the
lowering pass; Q4_CPU_KERNELS=off skips the extension: every caller keeps its portable path).

Threshold: the callers use these kernels for M <= SMALL_M = 64 rows; larger or symbolic M
(prefill) takes the unpack + oneDNN int8 GEMM path, which gains from oneDNN's blocking. The
crossover depends on the weight's size (2 threads of an AVX512-VNNI EPYC, the kernel called
alone against unpack + `torch._int_mm`, at commit 95fcb0c): SmolLM2's 576 x 1536 takes 0.18
against 0.26 ms at M = 32, 0.36 against 0.31 at 64, 0.70 against 0.45 at 128; Llama-2-7B's 4096 x 4096
takes 5.1 against 9.3 ms at M = 64, 8.8 against 10.3 at 128, 18.1 against 17.1 at 256. 64 is
where the small model's linears cross; a 7B model's linears at M = 65..200 give up 1.2x
(4096 x 4096, M = 128) to 1.8x (4096 x 11008). W4A16 keeps the kernel up to SMALL_M_W4A16 = 256
rows: its other path dequantizes the whole weight to float every call (4096 x 4096 at M = 128:
66 ms against FP32's 36; the kernel's 1.02x of FP32 there, in the README's earlier table).

Build: `torch.utils.cpp_extension.load` compiles csrc/q4_cpu.cpp on first use (-O3
-ffp-contract=off: the epilogue must round like the reference; -fopenmp: ATen's `parallel_for`
is inline code that runs on one thread without it) into torch's extensions directory, where
later processes find it cached. The OpenMP runtime is the one torch already loaded
(libgomp.so.1). The ops are registered in C++ (TORCH_LIBRARY),
so a call from Inductor's generated wrapper costs a few µs, not the ~30 µs of a Python custom
op; their fake implementations are registered here. If the build fails (no compiler), `load()`
warns once and returns False, and every caller keeps its portable path.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .checks import (
    activation_step_shape,
    check_bias,
    check_float_dtype,
    check_multipliers,
    check_packed,
    check_step,
    describe,
    fail,
)

SMALL_M = 64  # rows up to which the q4 ops and the lowering call the W4A4 kernel (the measured crossover)
SMALL_M_W4A16 = 256  # ... and the W4A16 one: its other path dequantizes the whole weight to float
FORCE_SCALAR = os.environ.get("Q4_CPU_KERNELS", "") == "scalar"  # test the portable loop on any CPU

SOURCE = Path(__file__).parent / "csrc" / "q4_cpu.cpp"
_lock = threading.Lock()
_loaded: Optional[bool] = None


def load() -> bool:
    """Build (first time) and load the extension; True when `torch.ops.q4_cpu` is usable."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
    return _loaded


def _build() -> bool:
    if os.environ.get("Q4_CPU_KERNELS", "") == "off":
        return False
    try:
        from torch.utils.cpp_extension import load as load_extension

        load_extension(name="q4_cpu_kernels", sources=[str(SOURCE)],
                       extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler or a failed build: the portable paths still work
        warnings.warn(f"qcompile: the q4_cpu C++ kernels could not be built ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); CPU linears fall back to "
                      f"unpacking the int4 weight every call (slower at decode). Set Q4_CPU_KERNELS=off to silence.",
                      RuntimeWarning, stacklevel=3)
        return False
    _register_fakes()
    return True


def use_for(m: object, limit: int) -> bool:
    """Whether a CPU linear over `m` rows (a concrete int; a symbolic M is prefill) takes q4_cpu:
    `limit` is SMALL_M (W4A4) or SMALL_M_W4A16."""
    return isinstance(m, int) and m <= limit and load()


# --- fake implementations (shapes and argument checks, as the q4:: ops report them) --------------


def _check_cpu_linear(op: str, x, x_name: str, w_packed, w_step, bias, out_dtype, w_mult, fmt: str) -> None:
    if x.dim() < 1:
        fail(op, x_name, "a tensor [..., K]", describe(x))
    check_packed(op, w_packed, w_step, x.shape[-1], f"{x_name}.shape[-1]", check_values=False)
    check_multipliers(op, w_mult, w_packed, x.shape[-1], fmt, check_values=False)
    check_bias(op, bias, w_packed.shape[0])
    check_float_dtype(op, "out_dtype", out_dtype)


def _register_fakes() -> None:
    @torch.library.register_fake("q4_cpu::linear_w4a4")
    def _(x_codes, w_packed, w_step, a_step, bias, out_dtype, force_scalar=False, w_values=None, w_mult=None):
        if w_values is not None and len(w_values) != 16:
            fail("linear_w4a4", "w_values", "None or 16 ints (each nibble's value)", repr(w_values))
        if x_codes.dtype != torch.int8:
            fail("linear_w4a4", "x_codes", "an int8 tensor [..., K] of activation codes", describe(x_codes))
        check_step("linear_w4a4", "a_step", a_step, activation_step_shape(x_codes, a_step), check_values=False)
        _check_cpu_linear("linear_w4a4", x_codes, "x_codes", w_packed, w_step, bias, out_dtype, w_mult, "int")
        return x_codes.new_empty((*x_codes.shape[:-1], w_packed.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("q4_cpu::linear_w4a16")
    def _(x, w_packed, w_step, bias, out_dtype, force_scalar=False, w_mult=None):
        if not x.is_floating_point():
            fail("linear_w4a16", "x", "a float tensor [..., K]", describe(x))
        _check_cpu_linear("linear_w4a16", x, "x", w_packed, w_step, bias, out_dtype, w_mult, "int")
        return x.new_empty((*x.shape[:-1], w_packed.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("q4_cpu::hadamard")
    def _(x, n, force_scalar=False):
        if x.dtype != torch.float32 or x.dim() < 1:
            fail("hadamard", "x", "a float32 tensor [..., K]", describe(x))
        if n < 1 or n & (n - 1) or x.shape[-1] % n:
            fail("hadamard", "n", f"a power of two dividing K = {x.shape[-1]}", repr(n))
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("q4_cpu::kron_factor")
    def _(x, factor, inner, force_scalar=False):
        if x.dtype != torch.float32 or x.dim() < 1:
            fail("kron_factor", "x", "a float32 tensor [..., K]", describe(x))
        if factor.dtype != torch.float32 or factor.dim() != 2 or factor.shape[0] != factor.shape[1]:
            fail("kron_factor", "factor", "a float32 tensor [d, d]", describe(factor))
        if inner < 1 or x.shape[-1] % (factor.shape[0] * inner):
            fail("kron_factor", "inner", f"an int >= 1 with d * inner dividing K = {x.shape[-1]}", repr(inner))
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("q4_cpu::attention")
    def _(query, key, value, attn_mask=None, is_causal=False, scale=None, force_scalar=False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != torch.float32 or t.dim() != 4:
                fail("attention", name, "a float32 tensor [batch, heads, length, dim]", describe(t))
        b, h, lq, d = query.shape
        if key.shape[0] != b or key.shape[3] != d or value.shape[:3] != key.shape[:3] or h % max(key.shape[1], 1):
            fail("attention", "key", f"[{b}, heads dividing {h}, length, {d}] with value [{b}, the same heads, the "
                 "same length, value dim]", f"key {tuple(key.shape)} and value {tuple(value.shape)}")
        return query.new_empty((b, h, lq, value.shape[-1]))
