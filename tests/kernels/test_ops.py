"""q4 ops: CPU kernels == plain-torch references bit for bit, fake impls, Inductor, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.kernels import formats, int4, ops, reference
from qcompile.kernels.ops import KernelArgumentError

q4 = torch.ops.q4


def make_linear(m_shape, k, n, bias, seed=0, bias_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x_codes = torch.randint(-8, 8, (*m_shape, k), generator=g, dtype=torch.int8)
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    a_step = torch.tensor(0.037)
    b = torch.randn(n, generator=g).to(bias_dtype) if bias else None
    return x_codes, int4.pack_int4(codes), w_step, a_step, b


# M = 1, 3, 5, 17, 33 (not multiples of 8), odd K and odd N, 2-D and 3-D leading dims.
SHAPES = [((1,), 8, 4), ((1,), 7, 5), ((3,), 33, 17), ((5,), 64, 3), ((17,), 129, 31), ((33,), 256, 64),
          ((2, 3), 15, 9), ((2, 5, 7), 64, 33), ((0,), 10, 4)]


@pytest.mark.parametrize("m_shape,k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_w4a4_equals_reference_bit_exactly(m_shape, k, n, bias, out_dtype):
    args = make_linear(m_shape, k, n, bias)
    got = q4.linear_w4a4(*args, out_dtype)
    expected = reference.linear_w4a4_ref(*args, out_dtype)
    assert got.shape == (*m_shape, n) and got.dtype == out_dtype
    assert torch.equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 20), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear_w4a4_equals_reference_on_random_shapes(m, k, n, bias, seed):
    args = make_linear((m,), k, n, bias, seed=seed, bias_dtype=torch.bfloat16)
    assert torch.equal(q4.linear_w4a4(*args, torch.float32), reference.linear_w4a4_ref(*args, torch.float32))


def test_linear_w4a4_integer_accumulation_is_exact():
    """With unit steps and no bias the op returns the integer dot products themselves."""
    x_codes, packed, _, _, _ = make_linear((9,), 37, 11, False)
    got = q4.linear_w4a4(x_codes, packed, torch.ones(11), torch.tensor(1.0), None, torch.float32)
    exact = x_codes.long() @ reference.unpack_int4_ref(packed, 37).long().t()
    assert torch.equal(got, exact.float())
    # Extreme codes over a long K: |acc| = 64 * K, still exact in int32 and float32.
    x = torch.full((2, 4099), -8, dtype=torch.int8)
    packed = int4.pack_int4(torch.full((3, 4099), -8, dtype=torch.int8))
    assert (q4.linear_w4a4(x, packed, torch.ones(3), torch.tensor(1.0), None, torch.float32) == 64 * 4099).all()


def test_linear_w4a4_without_the_onednn_int_mm_path_is_bit_identical(monkeypatch):
    """On CPUs where _int_mm would run its scalar loop the op multiplies in float32: same bits."""
    args = make_linear((2, 17), 65, 19, True)
    fast = q4.linear_w4a4(*args, torch.bfloat16)
    monkeypatch.setattr(ops, "_cpu_int_mm_is_fast", lambda: False)
    assert torch.equal(q4.linear_w4a4(*args, torch.bfloat16), fast)


def test_linear_w4a4_takes_non_contiguous_inputs():
    x_codes, packed, w_step, a_step, b = make_linear((6,), 24, 10, True)
    expected = reference.linear_w4a4_ref(x_codes, packed, w_step, a_step, b, torch.float32)
    x_t = x_codes.t().contiguous().t()  # same values, column-major
    wide = torch.zeros(10, 40, dtype=torch.uint8)
    wide[:, :12] = packed  # a row-strided view of the same bytes
    got = q4.linear_w4a4(x_t, wide[:, :12], w_step, a_step, b, torch.float32)
    assert torch.equal(got, expected)


def test_linear_w4a4_approximates_fake_quant_semantics():
    """Codes in, integer matmul, epilogue == quantize x and w, dequantize, F.linear (up to fp32 rounding)."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(4, 3, 48, generator=g), torch.randn(20, 48, generator=g), torch.randn(20, generator=g)
    a_step = x.abs().max() / 7
    codes, w_step = int4.quantize_weight_per_channel(w)
    got = q4.linear_w4a4(q4.quantize_per_tensor(x, a_step, 4), int4.pack_int4(codes), w_step, a_step, b, torch.float32)
    torch.testing.assert_close(got, reference.fake_quant_linear_ref(x, w, b, a_step), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_and_dequantize_equal_reference(bits):
    x = torch.randn(3, 7, 10) * 5
    x[0, 0, :5] = torch.tensor([0.15, -0.15, 0.45, 1e9, -1e9])  # ties round to even; far values clamp
    step = torch.tensor(0.3)
    codes = q4.quantize_per_tensor(x, step, bits)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, step, bits))
    assert int(codes.max()) == 2 ** (bits - 1) - 1 and int(codes.min()) == -(2 ** (bits - 1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(q4.dequantize_per_tensor(codes, step, dtype), reference.dequantize_per_tensor_ref(codes, step, dtype))
    assert torch.equal(q4.quantize_per_tensor(x.bfloat16(), step, bits), reference.quantize_per_tensor_ref(x.bfloat16(), step, bits))


@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 7, 10), (2, 33, 17)])
def test_quantize_with_sinks_equals_reference_and_feeds_the_linear(shape):
    """The rows `sinks` marks (a sequence's first token) take 8-bit codes with their own step, the
    others 4-bit ones; the linear's epilogue multiplies each row by its own step."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * 3
    x[:, 0] *= 200  # the sink's massive activations
    sinks = torch.zeros(*shape[:-1], 1, dtype=torch.bool)
    sinks[:, 0] = True
    step = torch.where(sinks, x[:, :1].abs().amax() / 127, torch.tensor(0.5))
    codes = q4.quantize_per_tensor(x, step, 4, "int", sinks, 8)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, step, 4, "int", sinks, 8))
    assert codes[:, 0].int().abs().max() >= 127 and all(-8 <= c <= 7 for c in codes[:, 1:].flatten().tolist())
    w = torch.randn(9, shape[-1], generator=g)
    w_codes, w_step = int4.quantize_weight_per_channel(w)
    packed = int4.pack_int4(w_codes)
    got = q4.linear_w4a4(codes, packed, w_step, step, None, torch.float32)
    assert torch.equal(got, reference.linear_w4a4_ref(codes, packed, w_step, step, None, torch.float32))
    # the sink row is computed at its own precision: close to the float product with the 4-bit weight
    w_dq = w_codes.float() * w_step[:, None]
    torch.testing.assert_close(got[:, 0], x[:, 0] @ w_dq.T, rtol=0.02, atol=0.02 * float((x[:, 0] @ w_dq.T).abs().max()))


@pytest.mark.parametrize("fmt", ["e2m1", "e3m0", "e1m2"])
def test_quantize_with_sinks_takes_any_format_for_the_other_rows(fmt):
    x = torch.randn(2, 6, 12) * 3
    x[:, 0] *= 100
    sinks = torch.zeros(2, 6, 1, dtype=torch.bool)
    sinks[:, 0] = True
    step = torch.where(sinks, torch.tensor(2.9), torch.tensor(0.4))
    codes = q4.quantize_per_tensor(x, step, 4, fmt, sinks, 8)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, step, 4, fmt, sinks, 8))
    assert torch.equal(codes[:, 1:], q4.quantize_per_tensor(x[:, 1:], step[:, 1:], 4, fmt))
    assert codes[:, 0].int().abs().max() >= 127


def test_bad_sinks_arguments():
    x, rows = torch.randn(2, 5, 8), torch.full((2, 5, 1), 0.1)
    sinks = torch.zeros(2, 5, 1, dtype=torch.bool)
    assert "'sinks'" in bad(q4.quantize_per_tensor, x, rows, 4, "int", sinks.float(), 8)
    assert "'sinks'" in bad(q4.quantize_per_tensor, x, rows, 4, "int", sinks[:, :, 0], 8)
    assert "one step per row" in bad(q4.quantize_per_tensor, x, torch.tensor(0.1), 4, "int", sinks, 8)
    assert "'sink_bits'" in bad(q4.quantize_per_tensor, x, rows, 4, "int", sinks, 9)
    assert "'sink_bits'" in bad(q4.quantize_per_tensor, x, rows, 4, "int", sinks, 3)


def test_quantize_rounds_half_to_even():
    codes = q4.quantize_per_tensor(torch.tensor([0.5, 1.5, -0.5, -2.5]), torch.tensor(1.0), 4)
    assert codes.tolist() == [0, 2, 0, -2]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 13, 64])
def test_dequantize_weight_equals_reference(bits, k):
    codes, step = int4.quantize_weight_per_channel(torch.randn(6, k), bits=bits)
    assert int(codes.abs().max()) <= 2 ** (bits - 1)
    packed = int4.pack_int4(codes)
    for dtype in (torch.float32, torch.bfloat16):
        got = q4.dequantize_weight_int4(packed, step, k, dtype)
        assert torch.equal(got, reference.dequantize_weight_int4_ref(packed, step, k, dtype))
    torch.testing.assert_close(q4.dequantize_weight_int4(packed, step, k, torch.float32), codes.float() * step[:, None])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 9), k=st.integers(0, 33), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, seed):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = int4.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2) and packed.is_contiguous()
    assert torch.equal(int4.unpack_int4(packed, k), codes)
    assert torch.equal(reference.unpack_int4_ref(packed, k), codes)


def test_unpack_of_every_byte_value():
    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(int4.unpack_int4(packed, 128), reference.unpack_int4_ref(packed, 128))
    assert torch.equal(int4.pack_int4(int4.unpack_int4(packed, 128)), packed)


def test_packed_layout_low_nibble_holds_even_k():
    packed = int4.pack_int4(torch.tensor([[1, -2, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0x1 | (0xE << 4), 0x7]]  # odd K: zero high nibble


def test_weight_quantization_is_symmetric_per_row_and_safe_on_zero_rows():
    w = torch.randn(3, 8)
    w[1] = 0
    codes, step = int4.quantize_weight_per_channel(w)
    assert codes.dtype == torch.int8 and step.dtype == torch.float32 and step.shape == (3,)
    assert torch.isfinite(step).all() and (codes[1] == 0).all()
    for row in (0, 2):
        assert step[row] == w[row].abs().max() / 7 and codes[row].abs().max() == 7


def test_opcheck():
    x_codes, packed, w_step, a_step, b = make_linear((5,), 12, 7, True)
    torch.library.opcheck(q4.linear_w4a4.default, (x_codes, packed, w_step, a_step, b, torch.float32))
    x3, packed3, w_step3, _, _ = make_linear((2, 3), 13, 5, False)
    torch.library.opcheck(q4.linear_w4a4.default, (x3, packed3, w_step3, a_step, None, torch.bfloat16))
    torch.library.opcheck(q4.quantize_per_tensor.default, (torch.randn(4, 12), a_step, 4))
    torch.library.opcheck(q4.dequantize_per_tensor.default, (x_codes, a_step, torch.float16))
    torch.library.opcheck(q4.dequantize_weight_int4.default, (packed, w_step, 12, torch.float32))
    # the 4-bit float formats (LLM-FP4): the same ops with their format arguments
    e2m1 = formats.pack(formats.round_to_format(torch.randn(7, 12) * 4, "e2m1").to(torch.int8), "e2m1")
    torch.library.opcheck(q4.linear_w4a4.default, (x_codes, e2m1, w_step, a_step, b, torch.float32, "e2m1"))
    torch.library.opcheck(q4.quantize_per_tensor.default, (torch.randn(4, 12), a_step, 4, "e3m0"))
    torch.library.opcheck(q4.dequantize_weight_int4.default, (e2m1, w_step, 12, torch.float32, "e2m1"))


@pytest.mark.parametrize("fmt", list(formats.FLOAT_FORMATS))
@pytest.mark.parametrize("m_shape", [(1,), (5,), (70,), (2, 3)])  # 70: above q4_cpu's SMALL_M, the GEMM path
def test_float_format_ops_equal_the_references_bit_exactly(fmt, m_shape):
    g = torch.Generator().manual_seed(len(m_shape) * 100 + m_shape[0])
    x, w, b = torch.randn(*m_shape, 65, generator=g), torch.randn(9, 65, generator=g), torch.randn(9, generator=g)
    a_step = x.abs().max() / formats.max_value(fmt)
    values, w_step = formats.quantize_weight_per_channel(w, fmt)
    packed = formats.pack(values, fmt)
    codes = q4.quantize_per_tensor(x, a_step, 4, fmt)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, a_step, 4, fmt))
    assert set(codes.unique().tolist()) <= set(formats.nibble_values(fmt))
    w_dq = q4.dequantize_weight_int4(packed, w_step, 65, torch.float32, fmt)
    assert torch.equal(w_dq, reference.dequantize_weight_int4_ref(packed, w_step, 65, torch.float32, fmt))
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = q4.linear_w4a4(codes, packed, w_step, a_step, b, out_dtype, fmt)
        assert torch.equal(got, reference.linear_w4a4_ref(codes, packed, w_step, a_step, b, out_dtype, fmt))
    # and it is the fake-quant linear: codes * a_step times the dequantized weight
    fake = torch.nn.functional.linear(q4.dequantize_per_tensor(codes, a_step, torch.float32), w_dq, b)
    torch.testing.assert_close(q4.linear_w4a4(codes, packed, w_step, a_step, b, torch.float32, fmt), fake,
                               rtol=1e-5, atol=1e-4)


def test_fake_implementations_give_shapes_and_dtypes():
    args = make_linear((2, 3), 9, 4, True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = q4.linear_w4a4(*args, torch.bfloat16)
        codes = q4.quantize_per_tensor(torch.empty(2, 9), args[3], 4)
        x_dq = q4.dequantize_per_tensor(codes, args[3], torch.float16)
        w_dq = q4.dequantize_weight_int4(args[1], args[2], 9, torch.float32)
    assert out.shape == (2, 3, 4) and out.dtype == torch.bfloat16
    assert codes.shape == (2, 9) and codes.dtype == torch.int8
    assert x_dq.shape == (2, 9) and x_dq.dtype == torch.float16
    assert w_dq.shape == (4, 9) and w_dq.dtype == torch.float32


def test_fake_implementations_check_shapes_too():
    x_codes, packed, w_step, a_step, _ = make_linear((3,), 16, 5, False)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(KernelArgumentError, match="'w_packed'"):
        q4.linear_w4a4(torch.empty(3, 18, dtype=torch.int8), packed, w_step, a_step, None, torch.float32)


def test_runs_inside_inductor():
    args = make_linear((6,), 20, 10, True)
    x = torch.randn(6, 20)

    def f(x, packed, w_step, a_step, bias):
        codes = q4.quantize_per_tensor(torch.relu(x), a_step, 4)
        return q4.linear_w4a4(codes, packed, w_step, a_step, bias, torch.float32) * 2

    expected = f(x, *args[1:])
    got = torch.compile(f, backend="inductor", fullgraph=True)(x, *args[1:])
    assert torch.equal(got, expected)


# --- bad input -------------------------------------------------------------------------------------


def bad(fn, *args) -> str:
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args)
    return str(info.value)


def test_bad_linear_arguments_name_the_argument():
    x_codes, packed, w_step, a_step, b = make_linear((3,), 16, 5, True)
    f32 = torch.float32
    assert "'x_codes'" in bad(q4.linear_w4a4, x_codes.float(), packed, w_step, a_step, b, f32)
    assert "'x_codes'" in bad(q4.linear_w4a4, x_codes.view(torch.uint8), packed, w_step, a_step, b, f32)
    assert "'w_packed'" in bad(q4.linear_w4a4, x_codes, packed.view(torch.int8), w_step, a_step, b, f32)
    assert "'w_packed'" in bad(q4.linear_w4a4, x_codes, packed[None], w_step, a_step, b, f32)
    message = bad(q4.linear_w4a4, x_codes[:, :14], packed, w_step, a_step, b, f32)  # K mismatch
    assert "'w_packed'" in message and "K = 14" in message
    assert "'w_packed'" in bad(q4.linear_w4a4, x_codes[:, :15], packed[:, :7], w_step, a_step, b, f32)  # K=15 ok: 8 bytes
    assert "'w_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step[:3], a_step, b, f32)
    assert "'w_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step.double(), a_step, b, f32)
    assert "'a_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step[None], b, f32)
    assert "'a_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step.bfloat16(), b, f32)
    assert "'bias'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step, b[:2], f32)
    assert "'bias'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step, b.int(), f32)
    assert "'out_dtype'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step, b, torch.int32)
    assert "'x_codes'" in bad(q4.linear_w4a4, torch.tensor(3, dtype=torch.int8), packed, w_step, a_step, b, f32)
    assert "'w_format'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step, b, f32, "fp4")
    assert "'format'" in bad(q4.quantize_per_tensor, torch.randn(3), a_step, 4, "e2m2")
    assert "'bits'" in bad(q4.quantize_per_tensor, torch.randn(3), a_step, 8, "e2m1")
    assert "'format'" in bad(q4.dequantize_weight_int4, packed, w_step, 16, f32, "E2M1")


def test_linear_with_odd_k_accepts_its_padded_packing_only():
    x_codes, packed, w_step, a_step, _ = make_linear((2,), 15, 4, False)
    assert packed.shape == (4, 8)
    assert "'w_packed'" in bad(q4.linear_w4a4, x_codes[:, :13], packed, w_step, a_step, None, torch.float32)


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
def test_bad_steps_are_rejected(value):
    x_codes, packed, w_step, _, _ = make_linear((3,), 16, 5, False)
    assert "'a_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step, torch.tensor(value), None, torch.float32)
    broken = w_step.clone()
    broken[2] = value
    message = bad(q4.linear_w4a4, x_codes, packed, broken, torch.tensor(0.1), None, torch.float32)
    assert "'w_step'" in message and "index 2" in message
    assert "'w_step'" in bad(q4.dequantize_weight_int4, packed, broken, 16, torch.float32)
    assert "'step'" in bad(q4.quantize_per_tensor, torch.randn(4), torch.tensor(value), 4)
    assert "'step'" in bad(q4.dequantize_per_tensor, x_codes, torch.tensor(value), torch.float32)


def test_bad_quantize_and_dequantize_arguments():
    step = torch.tensor(0.1)
    assert "'x'" in bad(q4.quantize_per_tensor, torch.ones(3, dtype=torch.int8), step, 4)
    assert "'bits'" in bad(q4.quantize_per_tensor, torch.randn(3), step, 1)
    assert "'bits'" in bad(q4.quantize_per_tensor, torch.randn(3), step, 9)
    assert "'step'" in bad(q4.quantize_per_tensor, torch.randn(3), torch.tensor([0.1, 0.2]), 4)  # neither () nor [1]
    assert "'codes'" in bad(q4.dequantize_per_tensor, torch.ones(3, dtype=torch.int32), step, torch.float32)
    assert "'dtype'" in bad(q4.dequantize_per_tensor, torch.ones(3, dtype=torch.int8), step, torch.int8)
    packed = int4.pack_int4(torch.zeros(4, 6, dtype=torch.int8))
    assert "'k'" in bad(q4.dequantize_weight_int4, packed, torch.ones(4), -1, torch.float32)
    assert "'w_packed'" in bad(q4.dequantize_weight_int4, packed, torch.ones(4), 8, torch.float32)
    assert "'dtype'" in bad(q4.dequantize_weight_int4, packed, torch.ones(4), 6, torch.float64)


def test_bad_format_helper_input():
    assert "got min 0, max 9" in bad(int4.pack_int4, torch.tensor([[9, 0]], dtype=torch.int8))
    assert "[-8, 7]" in bad(int4.pack_int4, torch.tensor([[-9]], dtype=torch.int8))
    assert "int8" in bad(int4.pack_int4, torch.tensor([[1.0]]))
    assert "2-D" in bad(int4.pack_int4, torch.zeros(4, dtype=torch.int8))
    assert "packed" in bad(int4.unpack_int4, torch.zeros(2, 3, dtype=torch.int8), 6)
    assert "ceil(k/2)" in bad(int4.unpack_int4, torch.zeros(2, 3, dtype=torch.uint8), 8)
    assert "k must be" in bad(int4.unpack_int4, torch.zeros(2, 3, dtype=torch.uint8), -1)
    assert "bits" in bad(int4.quantize_weight_per_channel, torch.randn(2, 2), 5)
    assert "weight" in bad(int4.quantize_weight_per_channel, torch.ones(2, 2, dtype=torch.int32))
    assert "finite" in bad(int4.quantize_weight_per_channel, torch.tensor([[1.0, float("nan")]]))


# --- dynamic activation steps (one per token, computed at run time) ----------------------------------


@pytest.mark.parametrize("fmt", ["int", "e2m1"])
@pytest.mark.parametrize("m_shape", [(1,), (5,), (70,), (2, 3)])
def test_token_steps_and_a_linear_with_row_steps_equal_the_references(fmt, m_shape):
    g = torch.Generator().manual_seed(m_shape[0])
    x, w, b = torch.randn(*m_shape, 65, generator=g), torch.randn(9, 65, generator=g), torch.randn(9, generator=g)
    x[(0,) * len(m_shape)] = 0  # a row of zeros: step 1, codes 0
    values, w_step = formats.quantize_weight_per_channel(w, fmt)
    packed = formats.pack(values, fmt)
    steps = q4.token_steps(x, 4, 0.9, fmt)
    assert steps.shape == (*m_shape, 1) and torch.equal(steps, reference.token_steps_ref(x, 4, 0.9, fmt))
    assert steps[(0,) * len(m_shape)].item() == 1.0
    codes = q4.quantize_per_tensor(x, steps, 4, fmt)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, steps, 4, fmt))
    for out_dtype in (torch.float32, torch.bfloat16):
        got = q4.linear_w4a4(codes, packed, w_step, steps, b, out_dtype, fmt)
        assert torch.equal(got, reference.linear_w4a4_ref(codes, packed, w_step, steps, b, out_dtype, fmt))
    fake = torch.nn.functional.linear(q4.dequantize_per_tensor(codes, steps, torch.float32),
                                      q4.dequantize_weight_int4(packed, w_step, 65, torch.float32, fmt), b)
    torch.testing.assert_close(q4.linear_w4a4(codes, packed, w_step, steps, b, torch.float32, fmt), fake,
                               rtol=1e-5, atol=1e-4)


def test_row_steps_opcheck_and_bad_shapes():
    x_codes, packed, w_step, _, b = make_linear((2, 3), 12, 7, True)
    steps = torch.rand(2, 3, 1) + 0.01
    torch.library.opcheck(q4.linear_w4a4.default, (x_codes, packed, w_step, steps, b, torch.float32))
    torch.library.opcheck(q4.token_steps.default, (torch.randn(2, 3, 12), 4, 1.0))
    torch.library.opcheck(q4.quantize_per_tensor.default, (torch.randn(2, 3, 12), steps, 4))
    assert "'a_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step, steps[:, :2], b, torch.float32)
    assert "'step'" in bad(q4.quantize_per_tensor, torch.randn(2, 3, 12), steps.reshape(2, 3), 4)
    assert "'clip'" in bad(q4.token_steps, torch.randn(3, 4), 4, 0.0)
    assert "'x'" in bad(q4.token_steps, torch.zeros(3, 4, dtype=torch.int8), 4)


# --- group multipliers ------------------------------------------------------------------------------


def grouped_weight(n: int, k: int, group: int, fmt: str = "int", seed: int = 0):
    """(packed, w_step, w_mult) with every multiplier 1..max_multiplier(fmt) and extreme codes."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)[torch.randint(0, 16, (n, k), generator=g)]
    values.view(-1)[:2] = torch.tensor([min(formats.nibble_values(fmt)), max(formats.nibble_values(fmt))])
    top = formats.max_multiplier(fmt)
    w_mult = (torch.arange(n * (k // group)) % top + 1).reshape(n, k // group).to(torch.uint8)
    return formats.pack(values, fmt), torch.rand(n, generator=g) + 0.01, w_mult


@pytest.mark.parametrize("fmt", ["int", "e2m1"])
@pytest.mark.parametrize("m_shape", [(1,), (5,), (70,), (2, 3)])  # 70: above q4_cpu's SMALL_M, the GEMM path
@pytest.mark.parametrize("k,group", [(32, 32), (96, 32), (128, 64), (192, 192)])
def test_group_multipliers_equal_the_references_bit_exactly(fmt, m_shape, k, group):
    """values = codes * their group's multiplier (int8 still): the linear, the weight-only linear and
    the dequantize equal their references, 8-bit activation codes included."""
    g = torch.Generator().manual_seed(k + m_shape[0])
    packed, w_step, w_mult = grouped_weight(11, k, group, fmt, seed=k)
    x_codes = torch.randint(-128, 128, (*m_shape, k), dtype=torch.int8, generator=g)
    a_step, b = torch.tensor(0.037), torch.randn(11, generator=g)
    w_dq = q4.dequantize_weight_int4(packed, w_step, k, torch.float32, fmt, w_mult)
    assert torch.equal(w_dq, reference.dequantize_weight_int4_ref(packed, w_step, k, torch.float32, fmt, w_mult))
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = q4.linear_w4a4(x_codes, packed, w_step, a_step, b, out_dtype, fmt, w_mult)
        assert torch.equal(got, reference.linear_w4a4_ref(x_codes, packed, w_step, a_step, b, out_dtype, fmt, w_mult))
    assert not torch.equal(got, q4.linear_w4a4(x_codes, packed, w_step, a_step, b, torch.bfloat16, fmt))
    if fmt == "int":
        x = torch.randn(*m_shape, k, generator=g)
        torch.testing.assert_close(q4.linear_w4a16(x, packed, w_step, b, torch.float32, w_mult),
                                   reference.linear_w4a16_ref(x, packed, w_step, b, torch.float32, w_mult),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int", "e2m1"])
# 70 rows: blocks of 1, 10 and 11 of the 23 columns (the last block short)
@pytest.mark.parametrize("block", [70, 70 * 10, 70 * 11 + 3])
def test_a_linear_computed_a_block_of_columns_at_a_time_is_bit_identical(monkeypatch, fmt, block):
    """Above OUTPUT_BLOCK accumulator elements linear_w4a4 computes its output columns a block at a
    time (a 49152-row head would otherwise hold its unpacked weight and two [M, N] copies): the same
    bits as the reference, with row steps, a bias and group multipliers, the last block short."""
    g = torch.Generator().manual_seed(block)
    packed, w_step, w_mult = grouped_weight(23, 64, 32, fmt, seed=block)
    x_codes = torch.randint(-8, 8, (2, 35, 64), dtype=torch.int8, generator=g)  # 70 rows: the GEMM path
    steps, b = torch.rand(2, 35, 1, generator=g) + 0.01, torch.randn(23, generator=g)
    monkeypatch.setattr(ops, "OUTPUT_BLOCK", block)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = q4.linear_w4a4(x_codes, packed, w_step, steps, b, out_dtype, fmt, w_mult)
        assert got.shape == (2, 35, 23) and got.dtype == out_dtype
        assert torch.equal(got, reference.linear_w4a4_ref(x_codes, packed, w_step, steps, b, out_dtype, fmt, w_mult))


def test_group_multipliers_opcheck_and_fakes():
    packed, w_step, w_mult = grouped_weight(7, 64, 32)
    x_codes, a_step = torch.randint(-8, 8, (5, 64), dtype=torch.int8), torch.tensor(0.1)
    torch.library.opcheck(q4.linear_w4a4.default, (x_codes, packed, w_step, a_step, None, torch.float32, "int", w_mult))
    torch.library.opcheck(q4.dequantize_weight_int4.default, (packed, w_step, 64, torch.float32, "int", w_mult))
    torch.library.opcheck(q4.linear_w4a16.default, (torch.randn(5, 64), packed, w_step, None, torch.float32, w_mult))
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(KernelArgumentError, match="'w_mult'"):
        q4.linear_w4a4(x_codes, packed, w_step, a_step, None, torch.float32, "int", w_mult[:, :1].expand(7, 3))


def test_the_int_mm_fallback_is_exact_with_multipliers(monkeypatch):
    """Without oneDNN's int8 GEMM the codes are multiplied in float: int8 x (codes * multiplier)
    sums pass 2**24 at K = 1536, so that path sums in float64."""
    packed, w_step, w_mult = grouped_weight(5, 1536, 32)
    x_codes = torch.full((70, 1536), -128, dtype=torch.int8)
    expected = reference.linear_w4a4_ref(x_codes, packed, w_step, torch.tensor(1.0), None, torch.float32, "int", w_mult)
    monkeypatch.setattr(ops, "_cpu_int_mm_is_fast", lambda: False)
    got = q4.linear_w4a4(x_codes, packed, w_step, torch.tensor(1.0), None, torch.float32, "int", w_mult)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("w_mult,message", [
    (torch.ones(7, 3, dtype=torch.uint8), "G groups dividing K = 64 into groups of a multiple of 32 k, got G = 3"),
    (torch.ones(7, 4, dtype=torch.uint8), "G groups dividing K = 64 into groups of a multiple of 32 k, got G = 4"),
    (torch.ones(6, 2, dtype=torch.uint8), r"uint8 tensor \[N, G\] = \[7, K / group\]"),
    (torch.ones(7, 2, dtype=torch.int8), r"uint8 tensor \[N, G\]"),
    (torch.zeros(7, 2, dtype=torch.uint8), r"multipliers in 1..15 \(their products with int values fit int8\), got 0..0"),
    (torch.full((7, 2), 16, dtype=torch.uint8), "multipliers in 1..15 .*got 16..16"),
])
def test_bad_group_multipliers_name_the_argument(w_mult, message):
    packed, w_step, _ = grouped_weight(7, 64, 32)
    x_codes = torch.zeros(2, 64, dtype=torch.int8)
    with pytest.raises(KernelArgumentError, match=f"q4::linear_w4a4: argument 'w_mult' must be .*{message}"):
        q4.linear_w4a4(x_codes, packed, w_step, torch.tensor(1.0), None, torch.float32, "int", w_mult)
    with pytest.raises(KernelArgumentError, match="q4::dequantize_weight_int4: argument 'w_mult'"):
        q4.dequantize_weight_int4(packed, w_step, 64, torch.float32, "int", w_mult)


# --- grouped_linear_w4a4: a mixture of experts' grouped GEMM ------------------------------------------


def make_experts(counts, k, n, seed=0, group=0, tail=0):
    """(x_codes [S, K], packed [E*N, ceil(K/2)], w_step [E*N], offs int32 [E]): len(counts) experts
    taking counts[e] rows each, sorted by expert, then `tail` rows no expert takes; with `group`,
    also group multipliers [E*N, K / group]."""
    g = torch.Generator().manual_seed(seed)
    experts = len(counts)
    x_codes = torch.randint(-8, 8, (sum(counts) + tail, k), generator=g, dtype=torch.int8)
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(experts * n, k, generator=g))
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    w_mult = None
    if group:
        w_mult = torch.randint(1, 16, (experts * n, k // group), generator=g, dtype=torch.uint8)
    return x_codes, int4.pack_int4(codes), w_step, offs, w_mult


# empty experts (first, middle, last, all), one row, odd K and N, rows no expert takes, and an
# expert above q4_cpu's SMALL_M (the GEMM path) beside ones below it (the decode kernel)
EXPERT_SHAPES = [([3, 0, 5, 1], 33, 7, 0), ([0, 0, 1], 8, 4, 0), ([1], 7, 5, 0), ([0, 0], 16, 3, 0),
                 ([2, 70, 0, 9], 65, 17, 0), ([4, 3], 15, 9, 3)]


@pytest.mark.parametrize("counts,k,n,tail", EXPERT_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_linear_w4a4_equals_reference_bit_exactly(counts, k, n, tail, out_dtype):
    x_codes, packed, w_step, offs, _ = make_experts(counts, k, n, seed=k + n, tail=tail)
    a_step = torch.tensor(0.037)
    got = q4.grouped_linear_w4a4(x_codes, packed, w_step, a_step, offs, out_dtype)
    assert got.shape == (sum(counts) + tail, n) and got.dtype == out_dtype
    assert torch.equal(got, reference.grouped_linear_w4a4_ref(x_codes, packed, w_step, a_step, offs, out_dtype))
    # each expert's rows are that expert's own linear_w4a4, bit for bit; the tail rows are 0
    start = 0
    for e, end in enumerate(offs.tolist()):
        rows = slice(e * n, (e + 1) * n)
        assert torch.equal(got[start:end], q4.linear_w4a4(x_codes[start:end], packed[rows], w_step[rows], a_step,
                                                          None, out_dtype))
        start = end
    assert not got[start:].any()


def test_grouped_linear_w4a4_with_multipliers_formats_and_row_steps_equals_reference():
    x_codes, packed, w_step, offs, w_mult = make_experts([5, 0, 3], 64, 6, group=32)
    a_step = torch.tensor(0.05)
    got = q4.grouped_linear_w4a4(x_codes, packed, w_step, a_step, offs, torch.float32, "int", w_mult)
    assert torch.equal(got, reference.grouped_linear_w4a4_ref(x_codes, packed, w_step, a_step, offs, torch.float32,
                                                              "int", w_mult))
    e2m1 = formats.pack(formats.round_to_format(torch.randn(18, 64) * 4, "e2m1").to(torch.int8), "e2m1")
    got = q4.grouped_linear_w4a4(x_codes, e2m1, w_step, a_step, offs, torch.float32, "e2m1")
    assert torch.equal(got, reference.grouped_linear_w4a4_ref(x_codes, e2m1, w_step, a_step, offs, torch.float32, "e2m1"))
    row_steps = torch.rand(8, 1) + 0.01  # a dynamic step per row (token)
    got = q4.grouped_linear_w4a4(x_codes, packed, w_step, row_steps, offs, torch.float32)
    assert torch.equal(got, reference.grouped_linear_w4a4_ref(x_codes, packed, w_step, row_steps, offs, torch.float32))


def test_grouped_linear_w4a4_opcheck_and_fake():
    x_codes, packed, w_step, offs, w_mult = make_experts([2, 0, 3], 64, 5, group=32)
    a_step = torch.tensor(0.1)
    torch.library.opcheck(q4.grouped_linear_w4a4.default, (x_codes, packed, w_step, a_step, offs, torch.float32))
    torch.library.opcheck(q4.grouped_linear_w4a4.default,
                          (x_codes, packed, w_step, a_step, offs.long(), torch.bfloat16, "int", w_mult))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = q4.grouped_linear_w4a4(x_codes, packed, w_step, a_step, offs, torch.float16)
    assert out.shape == (5, 5) and out.dtype == torch.float16


@pytest.mark.parametrize("change,message", [
    (dict(offs=torch.tensor([3, 2, 5], dtype=torch.int32)), r"'offs' must be non-decreasing, from 0 up to at most S = 5"),
    (dict(offs=torch.tensor([1, 2, 6], dtype=torch.int32)), r"'offs' must be non-decreasing"),
    (dict(offs=torch.tensor([1.0, 2.0, 5.0])), r"'offs' must be an int32 or int64 tensor \[E\]"),
    (dict(offs=torch.tensor([2, 5], dtype=torch.int32)), r"'w_packed' must be a 2-D uint8 tensor \[E \* N, ceil\(K/2\)\] of the 2"),
    (dict(x_codes=torch.zeros(5, 8, dtype=torch.int8)), r"'w_packed' must be ceil\(K/2\) = 4 bytes a row"),
    (dict(x_codes=torch.zeros(1, 5, 64, dtype=torch.int8)), r"'x_codes' must be an int8 tensor \[S, K\]"),
])
def test_bad_grouped_linear_arguments_name_the_argument(change, message):
    x_codes, packed, w_step, offs, _ = make_experts([2, 0, 3], 64, 5)
    args = dict(x_codes=x_codes, packed=packed, w_step=w_step, a_step=torch.tensor(0.1), offs=offs) | change
    with pytest.raises(KernelArgumentError, match=f"q4::grouped_linear_w4a4: argument {message}"):
        q4.grouped_linear_w4a4(args["x_codes"], args["packed"], args["w_step"], args["a_step"], args["offs"],
                               torch.float32)
