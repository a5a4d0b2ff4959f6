"""q4 ops: CPU kernels == plain-torch references bit for bit, fake impls, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.kernels import int4, reference
from qcompile.kernels.ops import KernelArgumentError

q4 = torch.ops.q4


def make_linear(m_shape, k, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_codes = torch.randint(-8, 8, (*m_shape, k), generator=g, dtype=torch.int8)
    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    a_step = torch.tensor(0.037)
    b = torch.randn(n, generator=g) if bias else None
    return x_codes, int4.pack_int4(codes), w_step, a_step, b


SHAPES = [((1,), 8, 4), ((1,), 7, 5), ((3,), 33, 17), ((5,), 64, 3), ((17,), 129, 31), ((33,), 256, 64),
          ((2, 3), 15, 9), ((2, 5, 7), 64, 33)]


@pytest.mark.parametrize("m_shape,k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_w4a4_equals_reference_bit_exactly(m_shape, k, n, bias, out_dtype):
    args = make_linear(m_shape, k, n, bias)
    got = q4.linear_w4a4(*args, out_dtype)
    expected = reference.linear_w4a4_ref(*args, out_dtype)
    assert got.shape == (*m_shape, n) and got.dtype == out_dtype
    assert torch.equal(got, expected)


def test_linear_w4a4_integer_accumulation_is_exact():
    """With unit steps and no bias the op returns the integer dot products themselves."""
    x_codes, packed, _, _, _ = make_linear((9,), 37, 11, False)
    ones = torch.ones(11)
    got = q4.linear_w4a4(x_codes, packed, ones, torch.tensor(1.0), None, torch.float32)
    exact = x_codes.long() @ int4.unpack_int4(packed, 37).long().t()
    assert torch.equal(got, exact.float())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_and_dequantize_equal_reference(bits):
    x = torch.randn(3, 7, 10) * 5
    step = torch.tensor(0.3)
    codes = q4.quantize_per_tensor(x, step, bits)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, step, bits))
    assert int(codes.max()) <= 2 ** (bits - 1) - 1 and int(codes.min()) >= -(2 ** (bits - 1))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(q4.dequantize_per_tensor(codes, step, dtype), reference.dequantize_per_tensor_ref(codes, step, dtype))


def test_dequantize_weight_equals_reference():
    codes, step = int4.quantize_weight_per_channel(torch.randn(6, 13), bits=3)
    packed = int4.pack_int4(codes)
    assert torch.equal(q4.dequantize_weight_int4(packed, step, 13, torch.float32),
                       reference.dequantize_weight_int4_ref(packed, step, 13, torch.float32))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, seed):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = int4.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2)
    assert torch.equal(int4.unpack_int4(packed, k), codes)


def test_packed_layout_low_nibble_holds_even_k():
    packed = int4.pack_int4(torch.tensor([[1, -2, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0x1 | (0xE << 4), 0x7]]


def test_weight_quantization_of_a_zero_row_does_not_divide_by_zero():
    w = torch.randn(3, 8)
    w[1] = 0
    codes, step = int4.quantize_weight_per_channel(w)
    assert torch.isfinite(step).all() and (codes[1] == 0).all()


def test_opcheck():
    x_codes, packed, w_step, a_step, b = make_linear((5,), 12, 7, True)
    torch.library.opcheck(q4.linear_w4a4.default, (x_codes, packed, w_step, a_step, b, torch.float32))
    torch.library.opcheck(q4.linear_w4a4.default, (x_codes, packed, w_step, a_step, None, torch.bfloat16))
    x = torch.randn(4, 12)
    torch.library.opcheck(q4.quantize_per_tensor.default, (x, a_step, 4))
    torch.library.opcheck(q4.dequantize_per_tensor.default, (x_codes, a_step, torch.float32))
    torch.library.opcheck(q4.dequantize_weight_int4.default, (packed, w_step, 12, torch.float32))


def test_fake_implementations_give_shapes_and_dtypes():
    args = make_linear((2, 3), 9, 4, True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = q4.linear_w4a4(*args, torch.bfloat16)
        codes = q4.quantize_per_tensor(torch.empty(2, 9), args[3], 4)
    assert out.shape == (2, 3, 4) and out.dtype == torch.bfloat16
    assert codes.shape == (2, 9) and codes.dtype == torch.int8


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
    with pytest.raises((KernelArgumentError, TypeError, ValueError, RuntimeError)) as info:
        fn(*args)
    return str(info.value)


def test_bad_linear_arguments_name_the_argument():
    x_codes, packed, w_step, a_step, b = make_linear((3,), 16, 5, True)
    assert "'x_codes'" in bad(q4.linear_w4a4, x_codes.float(), packed, w_step, a_step, b, torch.float32)
    assert "'w_packed'" in bad(q4.linear_w4a4, x_codes, packed.view(torch.int8), w_step, a_step, b, torch.float32)
    assert "'w_packed'" in bad(q4.linear_w4a4, x_codes[:, :14], packed, w_step, a_step, b, torch.float32)
    assert "'w_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step[:3], a_step, b, torch.float32)
    assert "'bias'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step, b[:2], torch.float32)
    assert "'out_dtype'" in bad(q4.linear_w4a4, x_codes, packed, w_step, a_step, b, torch.int32)


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
def test_bad_steps_are_rejected(value):
    x_codes, packed, w_step, _, _ = make_linear((3,), 16, 5, False)
    assert "'a_step'" in bad(q4.linear_w4a4, x_codes, packed, w_step, torch.tensor(value), None, torch.float32)
    broken = w_step.clone()
    broken[2] = value
    assert "'w_step'" in bad(q4.linear_w4a4, x_codes, packed, broken, torch.tensor(0.1), None, torch.float32)
    assert "'step'" in bad(q4.quantize_per_tensor, torch.randn(4), torch.tensor(value), 4)


def test_bad_pack_input():
    assert "[-8, 7]" in bad(int4.pack_int4, torch.tensor([[9]], dtype=torch.int8))
    assert "int8" in bad(int4.pack_int4, torch.tensor([[1.0]]))
    assert "bits" in bad(int4.quantize_weight_per_channel, torch.randn(2, 2), 5)
