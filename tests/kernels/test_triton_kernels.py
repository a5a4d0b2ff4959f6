"""Triton kernels == their plain-torch twins over odd shapes; bad input named before any launch.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py
sets before anything imports triton; exact, slow), which is how CI runs this file. On a GPU the
same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import fp4, int4, reference, triton_gemm, triton_norm
from qcompile.kernels.ops import KernelArgumentError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# M in {1, 3, 37} and a 3-D batch; N and K not multiples of the tiles, odd K.
SHAPES = [((1,), 7, 5), ((3,), 65, 33), ((37,), 128, 64), ((2, 3), 257, 100)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_within_one_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 from the interpreter: bit-exact (same epilogue order). Otherwise within one unit in
    the last place: the interpreter rounds float32 -> bfloat16 its own way, and a GPU may
    contract the epilogue's multiply and add into one rounding."""
    got = got.cpu()
    if DEVICE == "cpu" and got.dtype == torch.float32:
        assert torch.equal(got, expected)
    else:
        ulp = torch.finfo(got.dtype).eps * expected.float().abs().clamp_min(torch.finfo(got.dtype).tiny)
        assert bool(((got.float() - expected.float()).abs() <= ulp).all())


def w4_args(m_shape, k, n, bias, seed=0):
    g = gen(seed)
    x = torch.randint(-128, 128, (*m_shape, k), dtype=torch.int8, generator=g)  # 8-bit codes: W4A8 too
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, int4.pack_int4(codes), w_step, torch.tensor(0.0173), b)]


@pytest.mark.parametrize("m_shape,k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4a4_gemm_matches_reference(m_shape, k, n, bias, out_dtype):
    args = w4_args(m_shape, k, n, bias)
    got = triton_gemm.linear_w4a4(*args, out_dtype)
    expected = reference.linear_w4a4_ref(*[a.cpu() if a is not None else None for a in args], out_dtype)
    assert got.shape == (*m_shape, n) and got.dtype == out_dtype
    assert_within_one_ulp(got, expected)


@pytest.mark.parametrize("m_shape,k,n", SHAPES)
def test_w4a4_integer_accumulation_is_exact(m_shape, k, n):
    x, packed, _, _, _ = w4_args(m_shape, k, n, False, seed=1)
    ones = torch.ones(n, device=DEVICE)
    got = triton_gemm.linear_w4a4(x, packed, ones, torch.tensor(1.0, device=DEVICE), None, torch.float32)
    acc = x.cpu().reshape(-1, k).long() @ int4.unpack_int4(packed.cpu(), k).long().t()
    assert torch.equal(got.cpu().reshape(-1, n), acc.float())  # |acc| < 2**24: exact in float32


def test_w4a4_empty_batch():
    args = w4_args((0,), 16, 8, True)
    assert triton_gemm.linear_w4a4(*args, torch.float32).shape == (0, 8)


@pytest.mark.parametrize("m_shape,k,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_gemm_matches_reference(m_shape, k, n, dtype):
    g = gen(2)
    x = torch.randn(*m_shape, k, generator=g).to(dtype)
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g)
    args = (x, int4.pack_int4(codes), w_step, b)
    got = triton_gemm.linear_w4a16(*[a.to(DEVICE) for a in args])
    expected = reference.linear_w4a16_ref(*args)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("m_shape,k,n", SHAPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_fp4_gemm_matches_reference(m_shape, k, n, out_dtype):
    g = gen(3)
    x = torch.randn(*m_shape, k, generator=g)
    w = torch.randn(n, k, generator=g)
    a_scale, w_scale = fp4.scale_for(x), fp4.scale_for(w, dim=1)
    x_packed = fp4.pack_fp4(fp4.quantize_fp4(x, a_scale))
    w_packed = fp4.pack_fp4(fp4.quantize_fp4(w, w_scale[:, None]))
    b = torch.randn(n, generator=g)
    args = (x_packed, w_packed, w_scale, a_scale, b)
    got = triton_gemm.linear_fp4(*[a.to(DEVICE) for a in args], out_dtype, k)
    expected = reference.linear_fp4_ref(*args, out_dtype, k)
    assert_within_one_ulp(got, expected)
    # and it approximates the float product
    approx = reference.linear_fp4_ref(*args, torch.float32, k)
    cos = torch.nn.functional.cosine_similarity(approx.flatten(), (x @ w.t() + b).flatten(), dim=0)
    assert cos > 0.95


def test_fp4_format_round_trip_and_rounding():
    grid = torch.tensor(fp4.E2M1)
    values = torch.cat([grid, -grid[1:], torch.tensor([0.25, 0.3, 2.5, 5.0, 7.0, -100.0])])
    codes = fp4.quantize_fp4(values, torch.tensor(1.0))
    decoded = fp4.decode_fp4(codes)
    assert torch.equal(decoded[:15], values[:15])  # representable values are exact
    assert decoded[15:].tolist() == [0.0, 0.5, 2.0, 4.0, 6.0, -6.0]  # ties to the smaller, saturation
    assert torch.equal(fp4.unpack_fp4(fp4.pack_fp4(codes), codes.numel()), codes)


def assert_codes_match_up_to_ties(got: torch.Tensor, expected: torch.Tensor, scaled: torch.Tensor) -> None:
    """Codes equal, except by one step where y / a_step is within float error of a .5 tie."""
    diff = (got.cpu().int() - expected.int()).abs()
    assert diff.max() <= 1
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() < 1e-4
    assert bool(near_tie[diff == 1].all())


@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (37, 100), (2, 5, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_rms_norm_quantize_matches_reference(shape, dtype, bits):
    g = gen(4)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=g) + 0.5
    step = torch.tensor(0.11 if bits == 4 else 0.013)
    codes, y = triton_norm.rms_norm_quantize(x.to(DEVICE), w.to(DEVICE), 1e-5, step.to(DEVICE), bits, return_normalized=True)
    ref_codes, ref_y = reference.rms_norm_quantize_ref(x, w, 1e-5, step, bits)
    assert codes.dtype == torch.int8 and y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.cpu(), ref_y, rtol=tol, atol=tol)
    xf = x.float()
    scaled = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w / step
    assert_codes_match_up_to_ties(codes, ref_codes, scaled)


@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (37, 100), (2, 5, 384)])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_quantize_matches_reference(shape, affine):
    g = gen(5)
    x = torch.randn(*shape, generator=g) * 2 + 1
    w = torch.rand(shape[-1], generator=g) + 0.5 if affine else None
    b = torch.randn(shape[-1], generator=g) if affine else None
    step = torch.tensor(0.2)
    codes = triton_norm.layer_norm_quantize(x.to(DEVICE), *(t.to(DEVICE) if t is not None else None for t in (w, b)),
                                            1e-12, step.to(DEVICE), 4)
    ref_codes, ref_y = reference.layer_norm_quantize_ref(x, w, b, 1e-12, step, 4)
    assert_codes_match_up_to_ties(codes, ref_codes, ref_y / step)


def test_rounding_is_half_to_even_on_exact_ties():
    step = torch.tensor(1.0)
    # rows whose normalized values are exactly k + 0.5: x = [a, -a] has rms |a|, so y = +-1 * w
    w = torch.tensor([0.5, 1.5, 2.5, -3.5])
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    codes = triton_norm.rms_norm_quantize(x.to(DEVICE), w.to(DEVICE), 0.0, step.to(DEVICE), 4)
    assert codes.cpu().tolist() == [[0, -2, 2, 4]]  # round(.5)=0, round(-1.5)=-2, round(2.5)=2, round(3.5)=4


# --- bad input: a clear error naming the argument, before any kernel runs ----------------------


def test_bad_input_names_the_argument():
    x, packed, w_step, a_step, b = w4_args((3,), 64, 16, True)
    cases = [
        (lambda: triton_gemm.linear_w4a4(x[:, ::2], packed[:, :16], w_step, a_step, b, torch.float32), "x_codes"),
        (lambda: triton_gemm.linear_w4a4(x.float(), packed, w_step, a_step, b, torch.float32), "x_codes"),
        (lambda: triton_gemm.linear_w4a4(x, packed[:, :31], w_step, a_step, b, torch.float32), "w_packed"),
        (lambda: triton_gemm.linear_w4a4(x, packed.t().contiguous().t(), w_step, a_step, b, torch.float32), "w_packed"),
        (lambda: triton_gemm.linear_w4a4(x, packed, w_step * 0, a_step, b, torch.float32), "w_step"),
        (lambda: triton_gemm.linear_w4a4(x, packed, w_step, a_step * float("inf"), b, torch.float32), "a_step"),
        (lambda: triton_gemm.linear_w4a4(x, packed, w_step, a_step * float("nan"), b, torch.float32), "a_step"),
        (lambda: triton_gemm.linear_w4a4(x, packed, w_step, a_step, b[:3], torch.float32), "bias"),
        (lambda: triton_gemm.linear_w4a4(x, packed, w_step, a_step, b, torch.int32), "out_dtype"),
        (lambda: triton_gemm.linear_w4a16(x, packed, w_step, b), "'x'"),
        (lambda: triton_norm.rms_norm_quantize(x.float()[:, ::2], None, 1e-5, a_step, 4), "'x'"),
        (lambda: triton_norm.rms_norm_quantize(x.float(), None, 1e-5, a_step, 9), "bits"),
        (lambda: triton_norm.rms_norm_quantize(x.float(), torch.ones(3, device=DEVICE), 1e-5, a_step, 4), "weight"),
    ]
    for call, name in cases:
        with pytest.raises(KernelArgumentError, match=name):
            call()


def test_odd_k_needs_the_padded_byte():
    # K = 7 is held in 4 bytes a row; 3 bytes is a truncated weight
    x, packed, w_step, a_step, _ = w4_args((2,), 7, 5, False)
    with pytest.raises(KernelArgumentError, match=r"ceil\(K/2\) = 4 bytes a row for K = 7"):
        triton_gemm.linear_w4a4(x, packed[:, :3].contiguous(), w_step, a_step, None, torch.float32)
