"""q4_cpu C++ kernels: == the plain-torch references (W4A4 bit for bit, W4A16 within float32
summation order), on the VNNI path and the forced scalar path, through the q4 ops and the Inductor
lowering, and their argument checks. The extension builds once (cached on disk afterwards)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.backends import lowering
from qcompile.kernels import cpu_kernels, int4, reference, rotation
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


def test_rotate_decomposed_takes_the_hadamard_kernel_at_prefill_and_loops_at_decode(monkeypatch):
    monkeypatch.setattr(rotation, "USE_HADAMARD", True)
    factors = rotation.rotation_factors(576)  # 9 x 9, 64
    prefill = make_fx(rotation.rotate_decomposed)(torch.randn(40, 576), factors)
    assert "q4_cpu.hadamard" in prefill.code and "aten.mm" not in prefill.code, prefill.code
    decode = make_fx(rotation.rotate_decomposed)(torch.randn(1, 576), factors)
    assert "q4_cpu.hadamard" not in decode.code, decode.code


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
        with pytest.raises(KernelArgumentError, match="q4::hadamard: argument 'n' must be a power of two dividing K = 12"):
            torch.ops.q4_cpu.hadamard(torch.zeros(2, 12), 8)


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

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "Q4_HADAMARD": "1"}
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
