"""q4_cpu C++ kernels: == the plain-torch references (W4A4 bit for bit, W4A16 within float32
summation order), on the VNNI path and the forced scalar path, through the q4 ops and the Inductor
lowering, and their argument checks. The extension builds once (cached on disk afterwards)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.backends import lowering
from qcompile.kernels import cpu_kernels, formats, int4, ops, reference, rotation
from qcompile.kernels.ops import KernelArgumentError

q4 = torch.ops.q4


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu_kernels.load():
        pytest.fail("the q4_cpu extension did not build (see the RuntimeWarning)")


def make_weight(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    # make sure both extreme codes occur (-8 is never produced by the symmetric quantizer)
    codes.view(-1)[:2] = torch.tensor([-8, 7], dtype=torch.int8)[: codes.numel()]
    return int4.pack_int4(codes), w_step, g


M_VALUES = [0, 1, 3, 16, 17]
K_VALUES = [1, 7, 63, 64, 65, 576, 1000]
N_VALUES = [1, 6, 33]
PATHS = [False, True]  # force_scalar


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_linear_w4a4_equals_reference_bit_exactly(m, k, force_scalar):
    for n in N_VALUES:
        packed, w_step, g = make_weight(k, n, seed=m * 1000 + k + n)
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)  # 8-bit codes (the head)
        if m and k >= 2:
            x[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
        a_step, bias = torch.tensor(0.037), torch.randn(n, generator=g)
        for b in (None, bias, bias.to(torch.bfloat16)):
            for out_dtype in (torch.float32, torch.bfloat16):
                got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, a_step, b, out_dtype, force_scalar)
                expected = reference.linear_w4a4_ref(x, packed, w_step, a_step, b, out_dtype)
                assert got.shape == (m, n) and got.dtype == out_dtype
                assert torch.equal(got, expected), (m, k, n, b is not None, out_dtype)


def test_linear_w4a4_extreme_codes_over_a_long_k_are_exact():
    k = 11008
    x = torch.full((3, k), -128, dtype=torch.int8)
    x[1] = 127
    packed = int4.pack_int4(torch.full((5, k), -8, dtype=torch.int8))
    for force_scalar in PATHS:
        got = torch.ops.q4_cpu.linear_w4a4(x, packed, torch.ones(5), torch.tensor(1.0), None, torch.float32,
                                           force_scalar)
        expected = torch.tensor([1024.0 * k, -1016.0 * k, 1024.0 * k])[:, None].expand(3, 5)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("fmt", list(formats.FLOAT_FORMATS))
@pytest.mark.parametrize("k", [1, 7, 65, 576])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_linear_w4a4_with_a_float_weight_format_equals_reference_bit_exactly(m, k, fmt, force_scalar):
    """LLM-FP4's 4-bit float weights: the nibble table (`w_values`) decodes them, any int8 codes
    (the FP4 activations' values, up to E3M0's +-64, or 8-bit integers) multiply them exactly."""
    g = torch.Generator().manual_seed(m * k)
    table = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)
    for n in N_VALUES:
        values = table[torch.randint(0, 16, (n, k), generator=g)]
        packed, w_step = formats.pack(values, fmt), torch.rand(n, generator=g) + 0.01
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        a_step, b = torch.tensor(0.037), torch.randn(n, generator=g)
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, a_step, b, out_dtype, force_scalar,
                                               ops.nibble_table(fmt))
            assert torch.equal(got, reference.linear_w4a4_ref(x, packed, w_step, a_step, b, out_dtype, fmt)), (n, out_dtype)


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
def test_linear_w4a4_with_a_step_per_row_equals_reference_bit_exactly(force_scalar):
    """Dynamic activation steps (q4.token_steps): the epilogue multiplies by a_step[m] * w_step[n]."""
    for m, k, n in [(1, 7, 5), (3, 65, 33), (17, 576, 6)]:
        packed, w_step, g = make_weight(k, n, seed=m + k)
        x = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g)
        steps, b = torch.rand(m, 1, generator=g) + 0.01, torch.randn(n, generator=g)
        for out_dtype in (torch.float32, torch.bfloat16):
            got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, steps, b, out_dtype, force_scalar)
            assert torch.equal(got, reference.linear_w4a4_ref(x, packed, w_step, steps, b, out_dtype)), (m, k, n)


def test_linear_w4a4_e3m0_extremes_over_a_long_k_are_exact():
    k = 11008
    x = torch.full((2, k), 64, dtype=torch.int8)
    x[1] = -128
    packed = formats.pack(torch.full((3, k), -64, dtype=torch.int8), "e3m0")
    for force_scalar in PATHS:
        got = torch.ops.q4_cpu.linear_w4a4(x, packed, torch.ones(3), torch.tensor(1.0), None, torch.float32,
                                           force_scalar, ops.nibble_table("e3m0"))
        assert torch.equal(got, torch.tensor([-4096.0 * k, 8192.0 * k])[:, None].expand(2, 3))


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_linear_w4a16_equals_reference_within_float32_rounding(m, k, force_scalar):
    for n in N_VALUES:
        packed, w_step, g = make_weight(k, n, seed=m * 1000 + k + n)
        x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        for b in (None, bias):
            for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
                got = torch.ops.q4_cpu.linear_w4a16(x, packed, w_step, b, out_dtype, force_scalar)
                expected = reference.linear_w4a16_ref(x, packed, w_step, b, out_dtype)
                assert got.shape == (m, n) and got.dtype == out_dtype
                torch.testing.assert_close(got, expected, rtol=tol, atol=tol * (k ** 0.5))


def test_linear_w4a16_takes_bfloat16_activations_and_computes_in_float32():
    packed, w_step, g = make_weight(100, 9, seed=3)
    x = torch.randn(2, 5, 100, generator=g).to(torch.bfloat16)
    got = torch.ops.q4_cpu.linear_w4a16(x, packed, w_step, None, torch.float32)
    expected = reference.linear_w4a16_ref(x.float(), packed, w_step, None, torch.float32)
    assert got.shape == (2, 5, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


# --- group multipliers (w_mult: value * w_mult[n, k // group], formats.py) ------------------------

MULT_GROUPS = {32: [1], 96: [1, 3], 160: [1, 5], 576: [1, 6, 9, 18], 1536: [1, 12, 24, 48]}  # K: G (group K / G)


def make_multipliers(n, groups, top, g):
    """uint8 [n, groups] in 1..top, every value of it where there is room, top at [0, 0] (where
    make_weight puts the extreme codes)."""
    w_mult = torch.randint(1, top + 1, (n, groups), dtype=torch.uint8, generator=g)
    flat = w_mult.view(-1)
    flat[1 : top + 1] = torch.arange(1, top + 1, dtype=torch.uint8)[: flat.numel() - 1]
    flat[0] = top
    return w_mult


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("k", list(MULT_GROUPS))
@pytest.mark.parametrize("m", M_VALUES)
def test_linear_w4a4_with_group_multipliers_equals_reference_bit_exactly(m, k, force_scalar):
    """int4 codes times multipliers 1..15 (-8 * 15 = -120 at the extreme), 8-bit x codes; groups
    of 32 k to all of K, with a per-tensor and a per-row activation step."""
    for n in N_VALUES:
        packed, w_step, g = make_weight(k, n, seed=m * 1000 + k + n)
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        if m:
            x[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
        bias, rows = torch.randn(n, generator=g), torch.rand(*x.shape[:-1], 1, generator=g) + 0.01
        for groups in MULT_GROUPS[k]:
            w_mult = make_multipliers(n, groups, formats.max_multiplier("int"), g)
            # each step with each bias, the output dtypes alternating
            for a_step, out_dtypes in ((torch.tensor(0.037), (torch.float32, torch.bfloat16, torch.float32)),
                                       (rows, (torch.bfloat16, torch.float32, torch.bfloat16))):
                for b, out_dtype in zip((None, bias, bias.to(torch.bfloat16)), out_dtypes):
                    got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, a_step, b, out_dtype, force_scalar, None,
                                                       w_mult)
                    expected = reference.linear_w4a4_ref(x, packed, w_step, a_step, b, out_dtype, "int", w_mult)
                    assert got.shape == (m, n) and got.dtype == out_dtype
                    assert torch.equal(got, expected), (n, groups, a_step.dim(), b is not None, out_dtype)


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("fmt", list(formats.FLOAT_FORMATS))
def test_linear_w4a4_with_a_float_format_and_group_multipliers_equals_reference_bit_exactly(fmt, force_scalar):
    """FP4 weights (`w_values`) with multipliers up to the format's max_multiplier (E2M1 10, E1M2
    18, E3M0 1)."""
    g = torch.Generator().manual_seed(len(fmt))
    table = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)
    top = formats.max_multiplier(fmt)
    for m, k, n, groups in [(1, 576, 33, 18), (3, 160, 6, 1), (17, 1536, 6, 24), (16, 96, 33, 3)]:
        values = table[torch.randint(0, 16, (n, k), generator=g)]
        values[0, :2] = torch.tensor([min(table), max(table)], dtype=torch.int8)
        packed, w_step = formats.pack(values, fmt), torch.rand(n, generator=g) + 0.01
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w_mult, b = make_multipliers(n, groups, top, g), torch.randn(n, generator=g)
        for a_step in (torch.tensor(0.037), torch.rand(m, 1, generator=g) + 0.01):
            for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, a_step, b, out_dtype, force_scalar,
                                                   ops.nibble_table(fmt), w_mult)
                expected = reference.linear_w4a4_ref(x, packed, w_step, a_step, b, out_dtype, fmt, w_mult)
                assert torch.equal(got, expected), (m, k, n, a_step.dim(), out_dtype)


def test_linear_w4a4_extreme_codes_and_multipliers_over_a_long_k_are_exact():
    k = 11008
    x = torch.full((3, k), -128, dtype=torch.int8)
    x[1] = 127
    packed = int4.pack_int4(torch.full((5, k), -8, dtype=torch.int8))
    w_mult = torch.full((5, k // 32), 15, dtype=torch.uint8)
    for force_scalar in PATHS:
        got = torch.ops.q4_cpu.linear_w4a4(x, packed, torch.ones(5), torch.tensor(1.0), None, torch.float32,
                                           force_scalar, None, w_mult)
        expected = torch.tensor([15360.0 * k, -15240.0 * k, 15360.0 * k])[:, None].expand(3, 5)
        assert torch.equal(got, expected)


def test_linear_w4a4_with_multipliers_past_int8_products_is_still_the_reference():
    """Multipliers the q4 ops refuse (products past int8) are no case for the VNNI tables: those
    columns take the scalar loop, and every result is still the reference's, wrapped in int32 alike."""
    g = torch.Generator().manual_seed(11)
    for fmt, k, groups in (("int", 576, 18), ("e3m0", 1536, 1), ("e2m1", 96, 3)):
        table = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)
        packed = formats.pack(table[torch.randint(0, 16, (9, k), generator=g)], fmt)
        x = torch.randint(-128, 128, (3, k), dtype=torch.int8, generator=g)
        w_mult = torch.randint(1, formats.max_multiplier(fmt) + 1, (9, groups), dtype=torch.uint8, generator=g)
        w_mult[6:, 0] = torch.tensor([255, 16, 0], dtype=torch.uint8)  # only the last tile's columns
        w_step = torch.rand(9, generator=g) + 0.01
        expected = reference.linear_w4a4_ref(x, packed, w_step, torch.tensor(0.5), None, torch.float32, fmt, w_mult)
        for force_scalar in PATHS:
            got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, torch.tensor(0.5), None, torch.float32, force_scalar,
                                               ops.nibble_table(fmt), w_mult)
            assert torch.equal(got, expected), (fmt, force_scalar)


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("k", list(MULT_GROUPS))
@pytest.mark.parametrize("m", [0, 1, 3, 17])
def test_linear_w4a16_with_group_multipliers_equals_reference_within_float32_rounding(m, k, force_scalar):
    for n in N_VALUES:
        packed, w_step, g = make_weight(k, n, seed=m * 1000 + k + n)
        x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        for groups in MULT_GROUPS[k]:
            w_mult = make_multipliers(n, groups, formats.max_multiplier("int"), g)
            for b in (None, bias):
                for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
                    got = torch.ops.q4_cpu.linear_w4a16(x, packed, w_step, b, out_dtype, force_scalar, w_mult)
                    expected = reference.linear_w4a16_ref(x, packed, w_step, b, out_dtype, w_mult)
                    assert got.shape == (m, n) and got.dtype == out_dtype
                    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 15 * (k ** 0.5))


def test_multiplier_one_everywhere_is_no_multiplier():
    packed, w_step, g = make_weight(576, 33, seed=12)
    x, xf = torch.randint(-128, 128, (3, 576), dtype=torch.int8, generator=g), torch.randn(3, 576, generator=g)
    for groups in (1, 18):
        ones = torch.ones(33, groups, dtype=torch.uint8)
        for force_scalar in PATHS:
            assert torch.equal(
                torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, torch.tensor(0.1), None, torch.float32, force_scalar,
                                             None, ones),
                torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, torch.tensor(0.1), None, torch.float32, force_scalar))
            torch.testing.assert_close(torch.ops.q4_cpu.linear_w4a16(xf, packed, w_step, None, torch.float32,
                                                                     force_scalar, ones),
                                       torch.ops.q4_cpu.linear_w4a16(xf, packed, w_step, None, torch.float32,
                                                                     force_scalar), rtol=1e-6, atol=1e-5)


def test_leading_dims_are_kept():
    packed, w_step, g = make_weight(65, 7, seed=4)
    x = torch.randint(-8, 8, (2, 3, 65), dtype=torch.int8, generator=g)
    got = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, torch.tensor(0.1), None, torch.float32)
    assert torch.equal(got, reference.linear_w4a4_ref(x, packed, w_step, torch.tensor(0.1), None, torch.float32))


# --- the q4 ops and the lowering use the kernels ------------------------------------------------


@pytest.mark.parametrize("m", [1, 16, cpu_kernels.SMALL_M + 1, cpu_kernels.SMALL_M_W4A16 + 1])
def test_q4_ops_take_the_kernel_for_small_m_and_agree_on_either_side(m, monkeypatch):
    packed, w_step, g = make_weight(130, 11, seed=m)
    x = torch.randint(-8, 8, (m, 130), dtype=torch.int8, generator=g)
    xf, a_step, b = torch.randn(m, 130, generator=g), torch.tensor(0.05), torch.randn(11, generator=g)
    calls = []
    monkeypatch.setattr(cpu_kernels, "use_for", lambda rows, limit, original=cpu_kernels.use_for: calls.append(
        original(rows, limit)) or calls[-1])
    got = q4.linear_w4a4(x, packed, w_step, a_step, b, torch.float32)
    assert torch.equal(got, reference.linear_w4a4_ref(x, packed, w_step, a_step, b, torch.float32))
    got16 = q4.linear_w4a16(xf, packed, w_step, b, torch.float32)
    torch.testing.assert_close(got16, reference.linear_w4a16_ref(xf, packed, w_step, b), rtol=1e-5, atol=1e-4)
    assert calls == [m <= cpu_kernels.SMALL_M, m <= cpu_kernels.SMALL_M_W4A16]


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (3, 65, 9), (16, 1000, 33), (0, 10, 4)])
def test_q4_linear_w4a4_without_the_kernel_is_the_same_op(m, k, n, monkeypatch):
    """The unpack + integer GEMM path (prefill, or no compiler) at the shapes the kernel takes."""
    monkeypatch.setattr(cpu_kernels, "SMALL_M", -1)
    packed, w_step, g = make_weight(k, n, seed=m + k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    a_step, b = torch.tensor(0.02), torch.randn(n, generator=g)
    assert torch.equal(q4.linear_w4a4(x, packed, w_step, a_step, b, torch.bfloat16),
                       torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, a_step, b, torch.bfloat16))


@pytest.mark.parametrize("shape", [(1, 576), (1, 1, 1000), (3, 65)])
@pytest.mark.parametrize("bias", [False, True])
def test_inductor_lowering_at_decode_calls_the_kernel_and_equals_the_eager_op(shape, bias):
    k, n = shape[-1], 37
    packed, w_step, g = make_weight(k, n, seed=k)
    x = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
    xf = torch.randn(shape, generator=g)
    a_step, b = torch.tensor(0.07), (torch.randn(n, generator=g) if bias else None)

    gm = make_fx(lambda *args: q4.linear_w4a4(*args, torch.float32))(x, packed, w_step, a_step, b)
    lowered = make_fx(gm, decomposition_table=lowering.DECOMPOSITIONS)(x, packed, w_step, a_step, b)
    assert "q4_cpu.linear_w4a4" in lowered.code and "_int_mm" not in lowered.code
    compiled = lowering.lower(gm, [x, packed, w_step, a_step, b], "inductor", "auto", mode=None)
    assert torch.equal(compiled(x, packed, w_step, a_step, b), q4.linear_w4a4(x, packed, w_step, a_step, b,
                                                                               torch.float32))

    gm16 = make_fx(lambda *args: q4.linear_w4a16(*args, torch.float32))(xf, packed, w_step, b)
    lowered16 = make_fx(gm16, decomposition_table=lowering.DECOMPOSITIONS)(xf, packed, w_step, b)
    assert "q4_cpu.linear_w4a16" in lowered16.code
    compiled16 = lowering.lower(gm16, [xf, packed, w_step, b], "inductor", "auto", mode=None)
    assert torch.equal(compiled16(xf, packed, w_step, b), q4.linear_w4a16(xf, packed, w_step, b, torch.float32))


@pytest.mark.parametrize("rows", [1, 5])  # decode (the kernel) and, with SMALL_M lowered, the GEMM decomposition
@pytest.mark.parametrize("fmt", list(formats.FLOAT_FORMATS))
def test_inductor_lowering_of_a_float_format_linear_equals_the_eager_op(fmt, rows, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "SMALL_M", 2)
    g = torch.Generator().manual_seed(rows)
    values, w_step = formats.quantize_weight_per_channel(torch.randn(37, 130, generator=g), fmt)
    packed, x = formats.pack(values, fmt), torch.randn(rows, 130, generator=g)
    a_step, b = torch.tensor(0.11), torch.randn(37, generator=g)

    def linear(x, packed, w_step, a_step, b):
        return q4.linear_w4a4(q4.quantize_per_tensor(x, a_step, 4, fmt), packed, w_step, a_step, b, torch.float32, fmt)

    gm = make_fx(linear)(x, packed, w_step, a_step, b)
    lowered = make_fx(gm, decomposition_table=lowering.DECOMPOSITIONS)(x, packed, w_step, a_step, b)
    assert ("q4_cpu.linear_w4a4" in lowered.code) == (rows <= 2)
    compiled = lowering.lower(gm, [x, packed, w_step, a_step, b], "inductor", "auto", mode=None)
    assert torch.equal(compiled(x, packed, w_step, a_step, b), linear(x, packed, w_step, a_step, b))


@pytest.mark.parametrize("rows", [1, 5])  # the kernel, and (SMALL_M lowered) the GEMM decomposition
def test_inductor_lowering_with_dynamic_steps_equals_the_eager_ops(rows, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "SMALL_M", 2)
    packed, w_step, g = make_weight(130, 37, seed=rows)
    x, b = torch.randn(rows, 130, generator=g), torch.randn(37, generator=g)

    def linear(x, packed, w_step, b):
        steps = q4.token_steps(x, 4, 1.0)
        return q4.linear_w4a4(q4.quantize_per_tensor(x, steps, 4), packed, w_step, steps, b, torch.float32)

    gm = make_fx(linear)(x, packed, w_step, b)
    lowered = make_fx(gm, decomposition_table=lowering.DECOMPOSITIONS)(x, packed, w_step, b)
    assert "token_steps" not in lowered.code and "amax" in lowered.code  # a reduction Inductor fuses
    compiled = lowering.lower(gm, [x, packed, w_step, b], "inductor", "auto", mode=None)
    assert torch.equal(compiled(x, packed, w_step, b), linear(x, packed, w_step, b))


def test_inductor_lowering_above_the_threshold_keeps_the_gemm_decomposition(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "SMALL_M", 2)
    monkeypatch.setattr(cpu_kernels, "SMALL_M_W4A16", 2)
    packed, w_step, g = make_weight(64, 9, seed=5)
    x, xf = torch.randint(-8, 8, (3, 64), dtype=torch.int8, generator=g), torch.randn(3, 64, generator=g)
    a_step = torch.tensor(0.07)
    gm = make_fx(lambda *args: q4.linear_w4a4(*args, None, torch.float32))(x, packed, w_step, a_step)
    lowered = make_fx(gm, decomposition_table=lowering.DECOMPOSITIONS)(x, packed, w_step, a_step)
    assert "_int_mm" in lowered.code and "q4_cpu" not in lowered.code
    gm16 = make_fx(lambda *args: q4.linear_w4a16(*args, None, torch.float32))(xf, packed, w_step)
    lowered16 = make_fx(gm16, decomposition_table=lowering.DECOMPOSITIONS)(xf, packed, w_step)
    assert "q4_cpu" not in lowered16.code and "aten.mm" in lowered16.code.replace("aten.addmm", "aten.mm")
    torch.testing.assert_close(lowered16(xf, packed, w_step), reference.linear_w4a16_ref(xf, packed, w_step, None),
                               rtol=1e-5, atol=1e-4)


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("shape,n", [((1, 1), 1), ((3, 2), 2), ((5, 48), 16), ((2, 3, 576), 64), ((7, 1536), 512),
                                     ((0, 64), 64), ((1, 4096), 4096)])
def test_hadamard_is_the_sylvester_matrix_product_within_float32_rounding(shape, n, force_scalar):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, generator=g)
    dense = torch.kron(torch.eye(shape[-1] // n), rotation.sylvester(n).double())
    expected = (x.double() @ dense).float()
    got = torch.ops.q4_cpu.hadamard(x, n, force_scalar)
    assert got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hadamard_simd_and_scalar_give_the_same_bits_and_read_strided_input():
    x = torch.randn(64, 9 * 128).t()  # non-contiguous: [1152, 64] read as rows of 64
    simd, scalar = torch.ops.q4_cpu.hadamard(x, 64, False), torch.ops.q4_cpu.hadamard(x, 64, True)
    assert torch.equal(simd, scalar)
    assert torch.equal(simd, torch.ops.q4_cpu.hadamard(x.contiguous(), 64, False))


def test_hadamard_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match="argument 'n' must be a power of two dividing K = 12, got 8"):
        torch.ops.q4_cpu.hadamard(torch.zeros(2, 12), 8)
    with pytest.raises(RuntimeError, match="argument 'n' must be a power of two"):
        torch.ops.q4_cpu.hadamard(torch.zeros(2, 12), 3)
    with pytest.raises(RuntimeError, match="argument 'x' must be a float32 tensor"):
        torch.ops.q4_cpu.hadamard(torch.zeros(2, 16, dtype=torch.bfloat16), 16)


def test_rotate_decomposed_takes_the_hadamard_kernel_at_any_number_of_rows():
    """Prefill and a decode step rotate through the same transform: each row then rounds the same
    way at any M (a decode step must equal the no-cache forward's row bit for bit)."""
    factors = rotation.rotation_factors(576)  # 9 x 9, 64
    for rows in (40, 1):
        graph = make_fx(lambda x: rotation.rotate_decomposed(x, factors))(torch.randn(rows, 576))
        assert "q4_cpu.hadamard" in graph.code and "aten.mm" not in graph.code, graph.code
    x = torch.randn(40, 576)
    compiled = torch.compile(rotation.rotate_decomposed, dynamic=False)
    whole = compiled(x, factors)
    assert all(torch.equal(compiled(x[i:i + 1], factors), whole[i:i + 1]) for i in (0, 17, 39))


def learned_factors(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(d, d, generator=g))[0].contiguous() for d in sizes]


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("sizes", [[9, 64], [3, 16, 32], [5, 7], [2, 3], [16]])
def test_kron_factor_applies_learned_factors_like_the_dense_product(sizes, force_scalar):
    factors = learned_factors(sizes)
    n = math.prod(sizes)
    x = torch.randn(4, 3, n, generator=torch.Generator().manual_seed(n))
    y = x
    for i, f in enumerate(factors):
        y = torch.ops.q4_cpu.kron_factor(y, f, math.prod(sizes[i + 1:]), force_scalar)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y, rotation.rotate_reference(x, factors), rtol=1e-5, atol=1e-5)


def test_kron_factor_simd_and_scalar_give_the_same_bits_at_any_number_of_rows():
    factors = learned_factors([9, 64])
    x = torch.randn(64, 576 * 2).t().reshape(128, 576)[:40]  # strided source, made contiguous by the op
    for inner, f in ((64, factors[0]), (1, factors[1])):
        simd, scalar = torch.ops.q4_cpu.kron_factor(x, f, inner, False), torch.ops.q4_cpu.kron_factor(x, f, inner, True)
        assert torch.equal(simd, scalar)
        assert all(torch.equal(torch.ops.q4_cpu.kron_factor(x[i:i + 1], f, inner), simd[i:i + 1]) for i in (0, 17, 39))


def test_kron_factor_bad_arguments_are_named():
    f = torch.eye(4)
    with pytest.raises(RuntimeError, match="argument 'inner' must be >= 1 with d \\* inner"):
        torch.ops.q4_cpu.kron_factor(torch.zeros(2, 12), f, 2)
    with pytest.raises(RuntimeError, match="argument 'factor' must be a float32 CPU tensor \\[d, d\\]"):
        torch.ops.q4_cpu.kron_factor(torch.zeros(2, 12), torch.eye(4)[:3], 1)
    with pytest.raises(RuntimeError, match="argument 'x' must be a float32 CPU tensor"):
        torch.ops.q4_cpu.kron_factor(torch.zeros(2, 12, dtype=torch.bfloat16), f, 1)


def test_rotate_decomposed_takes_the_factor_kernel_for_learned_factors_at_any_number_of_rows():
    factors = learned_factors([9, 64])
    for rows in (40, 1):
        graph = make_fx(lambda x: rotation.rotate_decomposed(x, factors, False))(torch.randn(rows, 576))
        assert graph.code.count("q4_cpu.kron_factor") == 2 and "aten.mm" not in graph.code, graph.code
    x = torch.randn(40, 576)
    compiled = torch.compile(lambda x: rotation.rotate_decomposed(x, factors, False), dynamic=False)
    whole = compiled(x)
    torch.testing.assert_close(whole, rotation.rotate_reference(x, factors), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(compiled(x[i:i + 1]), whole[i:i + 1]) for i in (0, 17, 39))
    # the eager op takes the same kernel: the same bits as the lowering, row by row at any M
    eager = torch.ops.q4.rotate(x, factors, False)
    assert torch.equal(eager, whole)
    assert all(torch.equal(torch.ops.q4.rotate(x[i:i + 1], factors, False), eager[i:i + 1]) for i in (0, 17, 39))


def sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    """The reference: ATen's attention in float64, key and value heads repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                            is_causal=is_causal, scale=scale).float()


ATTENTION_SHAPES = [  # batch, heads, key/value heads, query rows, keys, dim, value dim
    (1, 4, 4, 7, 7, 64, 64), (2, 6, 2, 13, 29, 40, 24), (1, 2, 1, 1, 33, 17, 70), (1, 9, 3, 50, 50, 64, 64),
    (3, 1, 1, 5, 16, 1, 1), (1, 2, 2, 3, 130, 96, 130)]


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masking", ["causal", "bool", "float", "none"])
def test_attention_equals_sdpa_within_float32_rounding(shape, masking, force_scalar):
    b, h, hk, lq, lk, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = torch.randn(b, h, lq, d, generator=g), torch.randn(b, hk, lk, d, generator=g), torch.randn(b, hk, lk, dv, generator=g)
    allowed = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    allowed[..., 0] = True
    mask, is_causal, scale = None, False, None
    if masking == "causal":
        is_causal = True
    elif masking == "bool":
        mask = allowed
    elif masking == "float":  # per head, with -inf where not allowed
        mask, scale = torch.randn(b, h, lq, lk, generator=g).masked_fill(~allowed, float("-inf")), 0.3
    got = torch.ops.q4_cpu.attention(q, k, v, mask, is_causal, scale, force_scalar)
    assert got.shape == (b, h, lq, dv) and got.is_contiguous()
    torch.testing.assert_close(got, sdpa(q, k, v, mask, is_causal, scale), rtol=1e-5, atol=2e-6)


def test_attention_simd_and_scalar_give_the_same_bits_and_read_strided_input():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 20, 6, 72, generator=g).transpose(1, 2)  # [2, 6, 20, 72]: HF's layout, strided
    k, v = torch.randn(2, 2, 33, 72, generator=g), torch.randn(2, 33, 2, 72, generator=g).transpose(1, 2)
    mask = (torch.rand(2, 1, 20, 33, generator=g) > 0.2)
    for is_causal, m in ((True, None), (False, mask), (False, torch.zeros(2, 6, 20, 33).masked_fill(~mask, float("-inf")))):
        simd = torch.ops.q4_cpu.attention(q, k, v, m, is_causal, None, False)
        assert torch.equal(simd, torch.ops.q4_cpu.attention(q, k, v, m, is_causal, None, True))
        assert torch.equal(simd, torch.ops.q4_cpu.attention(q.contiguous(), k, v.contiguous(), m, is_causal, None))


@pytest.mark.parametrize("force_scalar", PATHS, ids=["simd", "scalar"])
def test_attention_rows_round_alike_at_any_length_cache_and_batch(force_scalar):
    """Row i of a causal prompt = a decode step at position i against a dynamic cache (i + 1
    keys), a static one (more keys, masked) and as one row of a left-padded batch, bit for bit."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 9, 70, 64, generator=g) for _ in range(3))
    kv = k[:, ::3], v[:, ::3]  # 3 key/value heads
    prompt = torch.ops.q4_cpu.attention(q, *kv, None, True, None, force_scalar)
    static_k, static_v = torch.zeros(1, 3, 100, 64), torch.zeros(1, 3, 100, 64)
    static_k[:, :, :70], static_v[:, :, :70] = kv
    padded_k, padded_v = torch.randn(2, 3, 75, 64, generator=g), torch.randn(2, 3, 75, 64, generator=g)
    padded_k[1, :, 5:], padded_v[1, :, 5:] = kv[0][0], kv[1][0]  # row 1: 5 padding keys first
    for i in (0, 1, 15, 16, 17, 40, 69):
        dynamic = torch.ops.q4_cpu.attention(q[:, :, i:i + 1], k[:, ::3, :i + 1], v[:, ::3, :i + 1], None, False, None,
                                             force_scalar)
        static_mask = (torch.arange(100) <= i)[None, None, None]
        static = torch.ops.q4_cpu.attention(q[:, :, i:i + 1], static_k, static_v, static_mask, False, None, force_scalar)
        padded_mask = torch.zeros(2, 1, 1, 75, dtype=torch.bool)
        padded_mask[0, ..., : 5 + i + 1] = True
        padded_mask[1, ..., 5: 5 + i + 1] = True
        padded_q = torch.cat([torch.randn(1, 9, 1, 64, generator=g), q[:, :, i:i + 1]])
        padded = torch.ops.q4_cpu.attention(padded_q, padded_k, padded_v, padded_mask, False, None, force_scalar)[1:]
        for other in (dynamic, static, padded):
            assert torch.equal(other, prompt[:, :, i:i + 1]), i


def test_attention_row_without_an_allowed_key_is_zeros():
    q, k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)
    mask = torch.tensor([[True] * 4, [False] * 4, [True, False, False, False]])[None, None]
    out = torch.ops.q4_cpu.attention(q, k, v, mask, False, None)
    assert torch.equal(out[0, 0, 1], torch.zeros(16)) and torch.equal(out[0, 0, 2], v[0, 0, 0] / 1.0)
    float_mask = torch.zeros(1, 1, 3, 4).masked_fill(~mask, float("-inf"))
    assert torch.equal(torch.ops.q4_cpu.attention(q, k, v, float_mask, False, None), out)


def test_attention_bad_arguments_are_named():
    q, kv = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="argument 'query' must be a float32 tensor \\[batch, heads, length, dim\\]"):
        torch.ops.q4_cpu.attention(q[0], kv, kv)
    with pytest.raises(RuntimeError, match="argument 'key' must be a float32 tensor"):
        torch.ops.q4_cpu.attention(q, kv.double(), kv)
    with pytest.raises(RuntimeError, match="must match query"):
        torch.ops.q4_cpu.attention(q, torch.zeros(1, 3, 5, 8), torch.zeros(1, 3, 5, 8))
    with pytest.raises(RuntimeError, match="argument 'attn_mask' must be a bool or float32 tensor"):
        torch.ops.q4_cpu.attention(q, kv, kv, torch.zeros(3, 5, dtype=torch.int32))


def test_rotate_refuses_a_power_of_two_factor_that_is_not_sylvester():
    factors = rotation.rotation_factors(24)  # 3 x 3, 8
    with pytest.raises(ValueError, match="factor of size 8 .* must be the normalized Sylvester-Hadamard"):
        q4.rotate(torch.randn(2, 24), [factors[0], -factors[1]])

def test_bad_arguments_are_named():
    packed, w_step, _ = make_weight(10, 4, seed=6)
    x = torch.zeros(1, 10, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="argument 'w_packed' must have ceil\\(K/2\\) = 6 bytes a row"):
        torch.ops.q4_cpu.linear_w4a4(torch.zeros(1, 12, dtype=torch.int8), packed, w_step, torch.tensor(1.0), None,
                                     torch.float32)
    with pytest.raises(RuntimeError, match="argument 'x_codes' must be an int8 tensor"):
        torch.ops.q4_cpu.linear_w4a4(x.float(), packed, w_step, torch.tensor(1.0), None, torch.float32)
    with pytest.raises(RuntimeError, match="argument 'bias' must be None or a float tensor of shape \\(4,\\)"):
        torch.ops.q4_cpu.linear_w4a16(x.float(), packed, w_step, torch.zeros(5), torch.float32)
    with pytest.raises(RuntimeError, match="argument 'out_dtype' must be float32, float16 or bfloat16"):
        torch.ops.q4_cpu.linear_w4a16(x.float(), packed, w_step, None, torch.int32)
    with pytest.raises(KernelArgumentError, match="q4::linear_w4a16: argument 'x' must be a float tensor"):
        q4.linear_w4a16(x, packed, w_step, None, torch.float32)
    with pytest.raises(KernelArgumentError, match="q4::linear_w4a16: argument 'w_step' must be finite and > 0"):
        q4.linear_w4a16(x.float(), packed, w_step * float("nan"), None, torch.float32)


def test_bad_multipliers_are_named():
    packed, w_step, _ = make_weight(96, 4, seed=13)
    x, xf, a = torch.zeros(1, 96, dtype=torch.int8), torch.zeros(1, 96), torch.tensor(1.0)
    calls = {"linear_w4a4": lambda w_mult: torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, a, None, torch.float32,
                                                                         False, None, w_mult),
             "linear_w4a16": lambda w_mult: torch.ops.q4_cpu.linear_w4a16(xf, packed, w_step, None, torch.float32,
                                                                          False, w_mult)}
    for op, call in calls.items():
        with pytest.raises(RuntimeError, match=f"q4_cpu::{op}: argument 'w_mult' must be None or a uint8 tensor "
                                               "\\[N, G\\] = \\[4, K / group\\] of group multipliers, got Char"):
            call(torch.ones(4, 3, dtype=torch.int8))
        with pytest.raises(RuntimeError, match="argument 'w_mult' must be None or a uint8 tensor .*shape \\[5, 3\\]"):
            call(torch.ones(5, 3, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match="argument 'w_mult' must be None or a uint8 tensor .*shape \\[12\\]"):
            call(torch.ones(12, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match=f"q4_cpu::{op}: argument 'w_mult' must have G groups dividing K = 96 "
                                               "into groups of a multiple of 32 k, got G = 5"):
            call(torch.ones(4, 5, dtype=torch.uint8))  # 5 does not divide 96
        with pytest.raises(RuntimeError, match="argument 'w_mult' must have G groups dividing K = 96 into groups of a "
                                               "multiple of 32 k, got G = 2"):
            call(torch.ones(4, 2, dtype=torch.uint8))  # groups of 48 k
        with pytest.raises(RuntimeError, match="argument 'w_mult' must be None or a uint8 tensor .*shape \\[4, 0\\]"):
            call(torch.ones(4, 0, dtype=torch.uint8))
        if op == "linear_w4a4":  # the checks come before the empty result of M = 0
            with pytest.raises(RuntimeError, match="argument 'w_mult' must have G groups dividing K = 96"):
                torch.ops.q4_cpu.linear_w4a4(x[:0], packed, w_step, a, None, torch.float32, False, None,
                                             torch.ones(4, 2, dtype=torch.uint8))


def test_fake_impls_give_shapes_and_check_arguments():
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, w_step, _ = make_weight(10, 4, seed=7)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.zeros(2, 3, 10, dtype=torch.int8)
        out = torch.ops.q4_cpu.linear_w4a4(x, packed, w_step, torch.tensor(1.0), None, torch.bfloat16)
        assert out.shape == (2, 3, 4) and out.dtype == torch.bfloat16
        out16 = torch.ops.q4_cpu.linear_w4a16(x.float(), packed, w_step, None, torch.float32)
        assert out16.shape == (2, 3, 4)
        with pytest.raises(KernelArgumentError, match="argument 'w_packed' must be ceil"):
            torch.ops.q4_cpu.linear_w4a16(torch.zeros(2, 12), packed, w_step, None, torch.float32)
        assert torch.ops.q4_cpu.hadamard(torch.zeros(2, 3, 576), 64).shape == (2, 3, 576)
        assert torch.ops.q4_cpu.kron_factor(torch.zeros(2, 3, 576), torch.zeros(64, 64), 1).shape == (2, 3, 576)
        with pytest.raises(KernelArgumentError, match="q4::kron_factor: argument 'inner' must be an int >= 1"):
            torch.ops.q4_cpu.kron_factor(torch.zeros(2, 12), torch.zeros(4, 4), 2)
        with pytest.raises(KernelArgumentError, match="q4::hadamard: argument 'n' must be a power of two dividing K = 12"):
            torch.ops.q4_cpu.hadamard(torch.zeros(2, 12), 8)
        q, kv = torch.zeros(2, 6, 5, 16), torch.zeros(2, 3, 9, 16)
        assert torch.ops.q4_cpu.attention(q, kv, torch.zeros(2, 3, 9, 24)).shape == (2, 6, 5, 24)
        with pytest.raises(KernelArgumentError, match="q4::attention: argument 'key' must be a float32 tensor"):
            torch.ops.q4_cpu.attention(q, kv[0], kv)


CACHED_COMPILE = """
import torch
from qcompile.backends import lowering
from qcompile.kernels import int4
q4 = torch.ops.q4
packed = int4.pack_int4(torch.ones(9, 64, dtype=torch.int8))
w_step, a_step, x = torch.ones(9), torch.tensor(1.0), torch.ones(1, 64, dtype=torch.int8)
f = lambda x: q4.linear_w4a4(x, packed, w_step, a_step, None, torch.float32)
c = torch.compile(f, backend=lambda gm, ex: lowering.lower(gm, ex, "inductor", "auto", None), dynamic=False)
assert torch.equal(c(x), torch.full((1, 9), 64.0))
from qcompile.kernels import rotation
factors = rotation.rotation_factors(576)
r = torch.compile(lambda x: q4.rotate(x, factors), backend=lambda gm, ex: lowering.lower(gm, ex, "inductor", "auto", None),
                  dynamic=False)
x = torch.randn(32, 576)
torch.testing.assert_close(r(x), rotation.rotate_reference(x, factors), rtol=1e-5, atol=1e-5)
from torch._dynamo.utils import counters
print(dict(counters["inductor"]))
"""


@pytest.mark.slow
def test_a_cached_compile_in_a_fresh_process_finds_the_q4_cpu_ops(tmp_path):
    """Inductor's FX graph cache (and a saved artifact) replays code calling q4_cpu ops without
    tracing the decomposition that loads them: `lowering.lower` loads them first."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", CACHED_COMPILE], env=env, capture_output=True, text=True)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert "fxgraph_cache_miss" in runs[0].stdout and "'fxgraph_cache_hit': 2" in runs[1].stdout, runs[1].stdout


def test_inductor_cache_keys_change_with_the_lowering_sources(tmp_path, monkeypatch):
    """`lowering.SourceStamp`'s uuid (part of Inductor's and AOTAutograd's cache keys) is a hash
    of the decompositions' and kernels' sources: an edit to one is a new key, not stale code."""
    source = tmp_path / "decomposition.py"
    source.write_text("def f(x): return x\n")
    monkeypatch.setattr(lowering.SourceStamp, "SOURCES", (str(source),))
    before = lowering.SourceStamp().uuid()
    assert lowering.SourceStamp().uuid() == before
    source.write_text("def f(x): return x + 1\n")
    assert lowering.SourceStamp().uuid() != before


def test_a_failed_build_warns_once_and_the_ops_fall_back(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'q4_cpu_kernels': c++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    with pytest.warns(RuntimeWarning, match="q4_cpu C\\+\\+ kernels could not be built .*c\\+\\+: not found"):
        assert not cpu_kernels.load()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernels.use_for(1, cpu_kernels.SMALL_M)  # no second build attempt, no second warning
    packed, w_step, g = make_weight(33, 5, seed=8)
    x = torch.randint(-8, 8, (1, 33), dtype=torch.int8, generator=g)
    got = q4.linear_w4a4(x, packed, w_step, torch.tensor(0.1), None, torch.float32)
    assert torch.equal(got, reference.linear_w4a4_ref(x, packed, w_step, torch.tensor(0.1), None, torch.float32))
