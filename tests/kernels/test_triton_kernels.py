"""Triton kernels == their plain-torch twins over odd shapes; bad input named before any launch.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before the
kernel modules import triton; exact, slow), which is how CI runs this file. On a GPU the same
tests run the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at kernel definition

import triton  # noqa: E402

from qcompile.kernels import formats, int4, reference, triton_gemm, triton_norm  # noqa: E402
from qcompile.kernels.ops import KernelArgumentError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_SHAPES = [(1,), (3,), (37,), (2, 3)]  # leading dims of x: M = 1, 3, 37, and a 3-D batch (M = 6)
NK = [(5, 7), (33, 65), (64, 128), (100, 257), (260, 301)]  # N, K not multiples of the tiles; odd K;
# (260, 301) takes the interpreter's large tile (N * K >= 2**16): two N tiles, two K blocks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def w4_args(m_shape, n, k, bias, seed=0):
    """x int8 codes (8-bit: W4A8 is the same kernel), packed int4 weight, w_step, a_step, bias."""
    g = gen(seed)
    x = torch.randint(-128, 128, (*m_shape, k), dtype=torch.int8, generator=g)
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    return x, int4.pack_int4(codes), w_step, torch.tensor(0.0173), b


def fp4_args(m_shape, n, k, bias, fmt, seed=3):
    """x and w quantized to a 4-bit float format (per tensor / per row): x's int8 values, the packed
    weight, w_step, a_step, bias; and x, w."""
    g = gen(seed)
    x, w = torch.randn(*m_shape, k, generator=g), torch.randn(n, k, generator=g)
    a_step = torch.tensor(2.5 / formats.max_value(fmt))  # clips the rare |x| > 2.5
    x_codes = formats.round_to_format(x / a_step, fmt).to(torch.int8)
    w_codes, w_step = formats.quantize_weight_per_channel(w, fmt)
    b = torch.randn(n, generator=g) if bias else None
    return (x_codes, formats.pack(w_codes, fmt), w_step, a_step, b), (x, w)


# --- W4A4 / W4A8 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m_shape", M_SHAPES)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4a4_is_bit_exact_with_the_reference(m_shape, n, k, bias, out_dtype):
    args = w4_args(m_shape, n, k, bias)
    got = triton_gemm.linear_w4a4(*to_device(*args), out_dtype)
    assert got.shape == (*m_shape, n) and got.dtype == out_dtype
    assert torch.equal(got.cpu(), reference.linear_w4a4_ref(*args, out_dtype))


@pytest.mark.parametrize("m_shape", M_SHAPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4a4_with_a_step_per_row_is_bit_exact_with_the_reference(m_shape, out_dtype):
    """Dynamic activation steps: a_step [..., 1], one per row, a_step[m] * w_step[n] in the epilogue."""
    x, packed, w_step, _, b = w4_args(m_shape, 100, 257, True)
    steps = torch.rand(*m_shape, 1, generator=gen(7)) + 0.01
    got = triton_gemm.linear_w4a4(*to_device(x, packed, w_step, steps, b), out_dtype)
    assert torch.equal(got.cpu(), reference.linear_w4a4_ref(x, packed, w_step, steps, b, out_dtype))


def test_w4a4_accumulates_extreme_codes_exactly():
    # every product is (-128) * (-8): acc = 257 * 1024 per element, and the int8 x int4 extremes
    x = torch.full((3, 257), -128, dtype=torch.int8)
    packed = int4.pack_int4(torch.full((5, 257), -8, dtype=torch.int8))
    one = torch.tensor(1.0)
    got = triton_gemm.linear_w4a4(*to_device(x, packed, torch.ones(5), one, None), torch.float32)
    assert torch.equal(got.cpu(), torch.full((3, 5), 257.0 * 1024))


@pytest.mark.parametrize("kernel", ["w4a4", "w4a16", "fp4"])
def test_empty_batch_returns_empty(kernel):
    if kernel == "fp4":
        (x, packed, w_step, a_step, b), _ = fp4_args((0,), 8, 16, True, "e2m1")
        got = triton_gemm.linear_w4a4(*to_device(x, packed, w_step, a_step, b), torch.float32, "e2m1")
    else:
        x, packed, w_step, a_step, b = w4_args((0,), 8, 16, True)
        if kernel == "w4a4":
            got = triton_gemm.linear_w4a4(*to_device(x, packed, w_step, a_step, b), torch.float32)
        else:
            got = triton_gemm.linear_w4a16(*to_device(x.float(), packed, w_step, b))
    assert got.shape == (0, 8)


def test_w4a4_empty_k_is_the_bias():
    x, packed, w_step, a_step, b = w4_args((3,), 4, 0, True)
    got = triton_gemm.linear_w4a4(*to_device(x, packed, w_step, a_step, b), torch.float32)
    assert torch.equal(got.cpu(), b.expand(3, 4))


# --- W4A16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("m_shape", M_SHAPES)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_matches_the_reference(m_shape, n, k, bias, dtype):
    _, packed, w_step, _, b = w4_args(m_shape, n, k, bias, seed=2)
    x = torch.randn(*m_shape, k, generator=gen(2)).to(dtype)
    got = triton_gemm.linear_w4a16(*to_device(x, packed, w_step, b))
    expected = reference.linear_w4a16_ref(x, packed, w_step, b)
    assert got.shape == (*m_shape, n) and got.dtype == dtype
    # float32 sums in another order than the float64 reference, then one rounding to dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4a16_out_dtype(out_dtype):
    _, packed, w_step, _, b = w4_args((3,), 33, 65, True, seed=2)
    x = torch.randn(3, 65, generator=gen(2)).to(torch.bfloat16)
    got = triton_gemm.linear_w4a16(*to_device(x, packed, w_step, b), out_dtype=out_dtype)
    expected = reference.linear_w4a16_ref(x, packed, w_step, b, out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got.cpu(), expected, rtol=1.6e-2, atol=1e-2 * expected.abs().max().item())


# --- FP4 (LLM-FP4's 4-bit floats through the same kernel) -------------------------------------------


FLOAT_FORMATS = list(formats.FLOAT_FORMATS)


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
@pytest.mark.parametrize("m_shape", M_SHAPES)
@pytest.mark.parametrize("n,k", NK)
def test_fp4_is_bit_exact_with_the_reference(fmt, m_shape, n, k):
    args, _ = fp4_args(m_shape, n, k, True, fmt)
    got = triton_gemm.linear_w4a4(*to_device(*args), torch.float32, fmt).cpu()
    assert got.shape == (*m_shape, n)
    assert torch.equal(got, reference.linear_w4a4_ref(*args, torch.float32, fmt))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_fp4_is_bit_exact_in_every_output_dtype(fmt, out_dtype):
    args, _ = fp4_args((2, 3), 100, 257, True, fmt)
    got = triton_gemm.linear_w4a4(*to_device(*args), out_dtype, fmt).cpu()
    assert got.dtype == out_dtype
    assert torch.equal(got, reference.linear_w4a4_ref(*args, out_dtype, fmt))


def test_fp4_extreme_values_accumulate_exactly():
    # E3M0's largest values: every product is 64 * (-64), acc = -257 * 4096 per element
    x = torch.full((3, 257), 64, dtype=torch.int8)
    packed = formats.pack(torch.full((5, 257), -64, dtype=torch.int8), "e3m0")
    got = triton_gemm.linear_w4a4(*to_device(x, packed, torch.ones(5), torch.tensor(1.0), None), torch.float32, "e3m0")
    assert torch.equal(got.cpu(), torch.full((3, 5), -257.0 * 4096))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_fp4_approximates_the_float_product(fmt):
    args, (x, w) = fp4_args((37,), 64, 128, True, fmt)
    got = triton_gemm.linear_w4a4(*to_device(*args), torch.float32, fmt).cpu()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), (x @ w.t() + args[4]).flatten(), dim=0)
    assert cos > 0.95


# --- group multipliers (w_mult: each group of k its own integer multiple of the row's step) --------


# M, N, K, G: groups of 32 k (G = K / 32) and one group a row (G = 1); K = 96 and 160 span the
# interpreter's BLOCK_K = 64 blocks across group boundaries, M = 33 three M tiles
MULT_SHAPES = [(1, 3, 32, 1), (5, 17, 96, 3), (33, 17, 160, 5), (5, 3, 160, 1), (33, 3, 96, 1)]


def mult_args(m_shape, n, k, groups, bias, fmt="int", seed=11):
    """x int8 codes (any int8), a packed weight of every nibble of `fmt`, w_step, a_step, bias and
    multipliers uint8 [N, G] in 1..max_multiplier(fmt), both ends included."""
    g = gen(seed)
    x = torch.randint(-128, 128, (*m_shape, k), dtype=torch.int8, generator=g)
    values = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)[torch.randint(0, 16, (n, k), generator=g)]
    top = formats.max_multiplier(fmt)
    w_mult = torch.randint(1, top + 1, (n, groups), dtype=torch.uint8, generator=g)
    w_mult.view(-1)[0], w_mult.view(-1)[-1] = top, 1
    w_step = torch.rand(n, generator=g) + 0.01
    b = torch.randn(n, generator=g) if bias else None
    return x, formats.pack(values, fmt), w_step, torch.tensor(0.0173), b, w_mult


@pytest.mark.parametrize("m,n,k,groups", MULT_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4a4_with_multipliers_is_bit_exact_with_the_reference(m, n, k, groups, bias, out_dtype):
    *args, w_mult = mult_args((m,), n, k, groups, bias)
    got = triton_gemm.linear_w4a4(*to_device(*args), out_dtype, w_mult=w_mult.to(DEVICE))
    assert got.shape == (m, n) and got.dtype == out_dtype
    expected = reference.linear_w4a4_ref(*args, out_dtype, w_mult=w_mult)
    assert torch.equal(got.cpu(), expected)
    assert not torch.equal(expected, reference.linear_w4a4_ref(*args, out_dtype))  # the multipliers count


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4a4_with_multipliers_and_a_step_per_row_is_bit_exact(out_dtype):
    x, packed, w_step, _, b, w_mult = mult_args((2, 3), 17, 160, 5, True)
    steps = torch.rand(2, 3, 1, generator=gen(12)) + 0.01
    got = triton_gemm.linear_w4a4(*to_device(x, packed, w_step, steps, b), out_dtype, w_mult=w_mult.to(DEVICE))
    assert got.shape == (2, 3, 17)
    assert torch.equal(got.cpu(), reference.linear_w4a4_ref(x, packed, w_step, steps, b, out_dtype, w_mult=w_mult))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_fp4_with_multipliers_is_bit_exact_with_the_reference(fmt, out_dtype):
    # multipliers up to 10 (e2m1's +-12), 18 (e1m2's +-7), 1 (e3m0's +-64)
    *args, w_mult = mult_args((5,), 17, 96, 3, True, fmt)
    got = triton_gemm.linear_w4a4(*to_device(*args), out_dtype, fmt, w_mult=w_mult.to(DEVICE))
    assert torch.equal(got.cpu(), reference.linear_w4a4_ref(*args, out_dtype, fmt, w_mult=w_mult))


@pytest.mark.parametrize("fmt,value", [("int", -8), ("e2m1", -12), ("e1m2", -7), ("e3m0", -64)])
def test_multipliers_at_the_int8_limit_accumulate_exactly(fmt, value):
    # every weight the format's largest magnitude times its group's multiplier, 1..max_multiplier:
    # products value * w_mult down to -127 (e1m2 -126, int4 -120), x = -128 and 127 (int4: -128 * -120)
    top = formats.max_multiplier(fmt)
    n, k, groups = 15, 160, 5
    w_mult = torch.tensor([[1 + (i + 3 * g) % top for g in range(groups)] for i in range(n)], dtype=torch.uint8)
    packed = formats.pack(torch.full((n, k), value, dtype=torch.int8), fmt)
    x = torch.stack([torch.full((k,), -128), torch.full((k,), 127)]).to(torch.int8)
    one = torch.tensor(1.0)
    got = triton_gemm.linear_w4a4(*to_device(x, packed, torch.ones(n), one, None), torch.float32, fmt,
                                  w_mult=w_mult.to(DEVICE))
    row_sums = w_mult.sum(1).double() * (k // groups) * value  # sum_k w[n, k] * w_mult[n, k // group]
    assert torch.equal(got.cpu().double(), torch.stack([-128 * row_sums, 127 * row_sums]))


@pytest.mark.parametrize("m,n,k,groups", MULT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_with_multipliers_matches_the_reference(m, n, k, groups, dtype):
    _, packed, w_step, _, b, w_mult = mult_args((m,), n, k, groups, True, seed=13)
    x = torch.randn(m, k, generator=gen(13)).to(dtype)
    got = triton_gemm.linear_w4a16(*to_device(x, packed, w_step, b), w_mult=w_mult.to(DEVICE))
    expected = reference.linear_w4a16_ref(x, packed, w_step, b, w_mult=w_mult)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_check_values_false_reads_no_multiplier(no_launch):
    # a 0 multiplier is only found by reading the values (a GPU sync): check_values=False launches;
    # the shape is still checked
    x, packed, w_step, a_step, b, w_mult = to_device(*mult_args((3,), 17, 96, 3, True))
    with pytest.raises(AssertionError, match="launched"):
        triton_gemm.linear_w4a4(x, packed, w_step, a_step, b, torch.float32, check_values=False, w_mult=w_mult * 0)
    with pytest.raises(KernelArgumentError, match="'w_mult' must be G groups dividing K = 96"):
        triton_gemm.linear_w4a4(x, packed, w_step, a_step, b, torch.float32, check_values=False,
                                w_mult=w_mult[:, :2].contiguous())


# --- normalization + quantize --------------------------------------------------------------------


def assert_codes_match_up_to_ties(got: torch.Tensor, expected: torch.Tensor, scaled: torch.Tensor) -> None:
    """Codes equal, except by one where y / a_step is within 1e-6 (relative) of a .5 tie: the row
    sums are reduced in another order, so y may differ from the reference's in the last bits."""
    diff = (got.cpu().int() - expected.int()).abs()
    assert diff.max() <= 1
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() <= 1e-6 * scaled.abs().clamp_min(1.0)
    assert bool(near_tie[diff == 1].all())


@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (37, 100), (2, 5, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_rms_norm_quantize_matches_the_reference(shape, dtype, bits):
    x = (torch.randn(*shape, generator=gen(4)) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=gen(5)) + 0.5
    step = torch.tensor(0.11 if bits == 4 else 0.013)
    codes, y = triton_norm.rms_norm_quantize(*to_device(x, w), 1e-5, step.to(DEVICE), bits, return_normalized=True)
    ref_codes, ref_y = reference.rms_norm_quantize_ref(x, w, 1e-5, step, bits)
    assert codes.dtype == torch.int8 and codes.shape == shape and y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.cpu(), ref_y, rtol=tol, atol=tol)
    _, y32 = reference.rms_norm_quantize_ref(x.float(), w, 1e-5, step, bits)  # the reference's float32 y
    assert_codes_match_up_to_ties(codes, ref_codes, y32 / step)


@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (37, 100), (2, 5, 384)])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_quantize_matches_the_reference(shape, affine, dtype):
    x = (torch.randn(*shape, generator=gen(6)) * 2 + 1).to(dtype)
    w = torch.rand(shape[-1], generator=gen(7)) + 0.5 if affine else None
    b = torch.randn(shape[-1], generator=gen(8)) if affine else None
    step = torch.tensor(0.2)
    codes, y = triton_norm.layer_norm_quantize(*to_device(x, w, b), 1e-6, step.to(DEVICE), 4, return_normalized=True)
    ref_codes, ref_y = reference.layer_norm_quantize_ref(x, w, b, 1e-6, step, 4)
    assert codes.dtype == torch.int8 and codes.shape == shape and y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.cpu(), ref_y, rtol=tol, atol=tol)
    _, y32 = reference.layer_norm_quantize_ref(x.float(), w, b, 1e-6, step, 4)
    assert_codes_match_up_to_ties(codes, ref_codes, y32 / step)
    only_codes = triton_norm.layer_norm_quantize(*to_device(x, w, b), 1e-6, step.to(DEVICE), 4)
    assert torch.equal(only_codes, codes)


def test_rounding_is_half_to_even_on_exact_ties():
    # x = [a, -a, a, -a] has rms |a|, so y = +-w exactly: the ties .5, -1.5, 2.5, 3.5
    w = torch.tensor([0.5, 1.5, 2.5, -3.5])
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    codes = triton_norm.rms_norm_quantize(*to_device(x, w), 0.0, torch.tensor(1.0, device=DEVICE), 4)
    expected = reference.rms_norm_quantize_ref(x, w, 0.0, torch.tensor(1.0), 4)[0]
    assert codes.cpu().tolist() == expected.tolist() == [[0, -2, 2, 4]]


def test_codes_saturate_at_the_bit_range():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    codes = triton_norm.rms_norm_quantize(*to_device(x, None), 0.0, torch.tensor(0.01, device=DEVICE), 3)
    assert codes.cpu().tolist() == [[3, -4, 3, -4]]


# --- bad input: a clear error naming the argument, before any kernel runs -------------------------


class _NoLaunch:
    """Stands in for a kernel: launching it fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched despite a bad argument")


@pytest.fixture
def no_launch(monkeypatch):
    for module, name in [(triton_gemm, "_w4a4"), (triton_gemm, "_w4a16"),
                         (triton_norm, "_norm_quantize_kernel")]:
        monkeypatch.setattr(module, name, _NoLaunch())


def _bad_calls():
    x, packed, w_step, a_step, b = to_device(*w4_args((3,), 16, 128, True))
    x64 = x[:, :64].contiguous()
    packed64 = packed[:, :32].contiguous()
    xf = x.float()
    w4a4, w4a16 = triton_gemm.linear_w4a4, triton_gemm.linear_w4a16
    rms, ln = triton_norm.rms_norm_quantize, triton_norm.layer_norm_quantize
    nan, inf, f32 = float("nan"), float("inf"), torch.float32
    with_value = lambda t, i, v: t.clone().index_fill_(0, torch.tensor([i], device=t.device), v)  # noqa: E731
    return [
        ("w4a4 non-contiguous x", lambda: w4a4(x[:, ::2], packed64, w_step, a_step, b, f32), "x_codes"),
        ("w4a4 float x", lambda: w4a4(xf, packed, w_step, a_step, b, f32), "x_codes"),
        ("w4a4 0-dim x", lambda: w4a4(x[0, 0], packed, w_step, a_step, b, f32), "x_codes"),
        ("w4a4 packed width", lambda: w4a4(x, packed[:, :63].contiguous(), w_step, a_step, b, f32), "w_packed"),
        ("w4a4 packed for other K", lambda: w4a4(x64, packed, w_step, a_step, b, f32), "w_packed"),
        ("w4a4 packed int8", lambda: w4a4(x, packed.view(torch.int8), w_step, a_step, b, f32), "w_packed"),
        ("w4a4 packed strided", lambda: w4a4(x, packed.t().contiguous().t(), w_step, a_step, b, f32), "w_packed"),
        ("w4a4 w_step zero", lambda: w4a4(x, packed, with_value(w_step, 3, 0.0), a_step, b, f32), "w_step"),
        ("w4a4 w_step inf", lambda: w4a4(x, packed, with_value(w_step, 0, inf), a_step, b, f32), "w_step"),
        ("w4a4 w_step nan", lambda: w4a4(x, packed, with_value(w_step, 15, nan), a_step, b, f32), "w_step"),
        ("w4a4 w_step float64", lambda: w4a4(x, packed, w_step.double(), a_step, b, f32), "w_step"),
        ("w4a4 w_step shape", lambda: w4a4(x, packed, w_step[:8], a_step, b, f32), "w_step"),
        ("w4a4 a_step zero", lambda: w4a4(x, packed, w_step, a_step * 0, b, f32), "a_step"),
        ("w4a4 a_step negative", lambda: w4a4(x, packed, w_step, -a_step, b, f32), "a_step"),
        ("w4a4 a_step inf", lambda: w4a4(x, packed, w_step, a_step * inf, b, f32), "a_step"),
        ("w4a4 a_step nan", lambda: w4a4(x, packed, w_step, a_step * nan, b, f32), "a_step"),
        ("w4a4 a_step [1]", lambda: w4a4(x, packed, w_step, a_step.reshape(1), b, f32), "a_step"),
        ("w4a4 bias shape", lambda: w4a4(x, packed, w_step, a_step, b[:3], f32), "bias"),
        ("w4a4 bias int", lambda: w4a4(x, packed, w_step, a_step, b.int(), f32), "bias"),
        ("w4a4 bias strided", lambda: w4a4(x, packed, w_step, a_step, torch.stack([b, b], 1)[:, 0], f32), "bias"),
        ("w4a4 out_dtype", lambda: w4a4(x, packed, w_step, a_step, b, torch.int32), "out_dtype"),
        ("w4a16 int8 x", lambda: w4a16(x, packed, w_step, b), "'x'"),
        ("w4a16 float64 x", lambda: w4a16(xf.double(), packed, w_step, b), "'x'"),
        ("w4a16 non-contiguous x", lambda: w4a16(xf[:, ::2], packed64, w_step, b), "'x'"),
        ("w4a16 packed width", lambda: w4a16(xf, packed64, w_step, b), "w_packed"),
        ("w4a16 w_step nan", lambda: w4a16(xf, packed, with_value(w_step, 2, nan), b), "w_step"),
        ("w4a16 out_dtype", lambda: w4a16(xf, packed, w_step, b, torch.float64), "out_dtype"),
        ("w4a4 w_format", lambda: w4a4(x, packed, w_step, a_step, b, f32, "e2m2"), "w_format"),
        ("rms non-contiguous x", lambda: rms(xf[:, ::2], None, 1e-5, a_step, 4), "'x'"),
        ("rms int8 x", lambda: rms(x, None, 1e-5, a_step, 4), "'x'"),
        ("rms bits", lambda: rms(xf, None, 1e-5, a_step, 9), "bits"),
        ("rms weight shape", lambda: rms(xf, torch.ones(3, device=DEVICE), 1e-5, a_step, 4), "weight"),
        ("rms a_step zero", lambda: rms(xf, None, 1e-5, a_step * 0, 4), "a_step"),
        ("rms a_step nan", lambda: rms(xf, None, 1e-5, a_step * nan, 4), "a_step"),
        ("rms eps", lambda: rms(xf, None, -1.0, a_step, 4), "eps"),
        ("ln bias shape", lambda: ln(xf, None, torch.ones(3, device=DEVICE), 1e-5, a_step, 4), "bias"),
        ("ln a_step inf", lambda: ln(xf, None, None, 1e-5, a_step * inf, 4), "a_step"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[name for name, _, _ in _bad_calls()])
def test_bad_input_names_the_argument_before_launching(case, no_launch):
    _, call, argument = _bad_calls()[case]
    with pytest.raises(KernelArgumentError, match=argument):
        call()


def test_odd_k_needs_the_padded_byte(no_launch):
    # K = 7 is held in 4 bytes a row; 3 bytes is a truncated weight
    x, packed, w_step, a_step, _ = to_device(*w4_args((2,), 5, 7, False))
    with pytest.raises(KernelArgumentError, match=r"'w_packed' must be ceil\(K/2\) = 4 bytes a row for K = 7"):
        triton_gemm.linear_w4a4(x, packed[:, :3].contiguous(), w_step, a_step, None, torch.float32)


def _bad_multiplier_calls():
    x, packed, w_step, a_step, b = to_device(*w4_args((3,), 16, 128, True))
    xf = x.float()
    w4a4, w4a16 = triton_gemm.linear_w4a4, triton_gemm.linear_w4a16
    ones = lambda *shape, dtype=torch.uint8: torch.ones(shape, dtype=dtype, device=DEVICE)  # noqa: E731
    with_value = lambda t, v: t.clone().index_fill_(1, torch.tensor([2], device=t.device), v)  # noqa: E731
    f32 = torch.float32
    groups = r"'w_mult' must be G groups dividing K = 128 into groups of a multiple of 32 k, got G = {}"
    in_range = r"'w_mult' must be multipliers in 1\.\.{} \(their products with {} values fit int8\), got {}"
    form = r"'w_mult' must be None or a uint8 tensor \[N, G\] = \[16, K / group\] of group multipliers, got {}"
    return [
        ("w4a4 G not dividing K", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(16, 3)),
         groups.format(3)),
        ("w4a4 group of 16 k", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(16, 8)), groups.format(8)),
        ("w4a4 multiplier 0", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=with_value(ones(16, 4), 0)),
         in_range.format(15, "int", r"0\.\.1")),
        ("w4a4 multiplier 16", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=with_value(ones(16, 4), 16)),
         in_range.format(15, "int", r"1\.\.16")),
        ("e2m1 multiplier 11",
         lambda: w4a4(x, packed, w_step, a_step, b, f32, "e2m1", w_mult=with_value(ones(16, 4), 11)),
         in_range.format(10, "e2m1", r"1\.\.11")),
        ("e3m0 multiplier 2", lambda: w4a4(x, packed, w_step, a_step, b, f32, "e3m0", w_mult=ones(16, 1) * 2),
         in_range.format(1, "e3m0", r"2\.\.2")),
        ("w4a4 int8 multipliers", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(16, 4, dtype=torch.int8)),
         form.format("torch.int8 tensor of shape")),
        ("w4a4 multipliers for 8 rows", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(8, 4)),
         form.format(r"torch.uint8 tensor of shape \(8, 4\)")),
        ("w4a4 1-D multipliers", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(16)),
         form.format(r"torch.uint8 tensor of shape \(16,\)")),
        ("w4a4 no group", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(16, 0)),
         form.format(r"torch.uint8 tensor of shape \(16, 0\)")),
        ("w4a4 strided multipliers", lambda: w4a4(x, packed, w_step, a_step, b, f32, w_mult=ones(4, 16).t()),
         r"'w_mult' must be contiguous"),
        ("w4a16 G not dividing K", lambda: w4a16(xf, packed, w_step, b, w_mult=ones(16, 5)),
         r"q4::linear_w4a16 \(triton\): argument " + groups.format(5)),
        ("w4a16 multiplier 16", lambda: w4a16(xf, packed, w_step, b, w_mult=with_value(ones(16, 4), 16)),
         in_range.format(15, "int", r"1\.\.16")),
        ("w4a16 float multipliers", lambda: w4a16(xf, packed, w_step, b, w_mult=ones(16, 4, dtype=torch.float32)),
         form.format("torch.float32 tensor of shape")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_multiplier_calls())),
                         ids=[name for name, _, _ in _bad_multiplier_calls()])
def test_bad_multipliers_are_named_before_launching(case, no_launch):
    _, call, message = _bad_multiplier_calls()[case]
    with pytest.raises(KernelArgumentError, match=message):
        call()


def test_the_general_kernels_time_only_tiles_no_taller_than_the_shape_class(monkeypatch):
    """Autotuning is keyed by M's class (a power of two), not by M: a tile of 128 rows is not
    timed for a decode step's one row."""
    monkeypatch.setattr(triton_gemm, "INTERPRET", False)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 128}) for bm in (16, 32, 64, 128)]
    rows = {m: [c.kwargs["BLOCK_M"] for c in triton_gemm._tiles_for_the_class(
        configs, {"M_CLASS": triton_gemm.shape_class(m), "N": 4096, "K": 4096})] for m in (1, 20, 3000)}
    assert rows == {1: [16], 20: [16, 32], 3000: [16, 32, 64, 128]}


def test_running_out_of_gpu_memory_while_autotuning_names_the_shape(monkeypatch):
    class OutOfMemoryWhileTuning:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
            return launch

    monkeypatch.setattr(triton_gemm, "_w4a4", OutOfMemoryWhileTuning())
    args = w4_args((3,), 40, 96, False)
    with pytest.raises(triton_gemm.TuningError, match=r"out of GPU memory while autotuning .* M=3 \(class 4\), N=40, K=96"):
        triton_gemm.linear_w4a4(*args, torch.float32)
