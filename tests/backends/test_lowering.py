"""The Inductor lowering: the q4 decompositions compute what the ops compute, and Inductor sees them."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

from qcompile.backends import lowering
from qcompile.kernels import cpu_kernels, int4, ops, reference, rotation
from tests.helpers.backend import compile_and_run
from tests.helpers.models import ids

q4 = torch.ops.q4


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_decomposition_compiled_by_inductor_is_the_reference_including_ties(bits):
    step = torch.tensor(0.25)
    ties = (torch.arange(-20, 20) + 0.5) * step  # exactly halfway: half-to-even decides
    x = torch.cat([ties, torch.randn(1000) * 3, torch.tensor([1e9, -1e9])])
    compiled = torch.compile(ops.quantize_math, fullgraph=True)
    assert torch.equal(compiled(x, step, bits), reference.quantize_per_tensor_ref(x, step, bits))


def test_quantize_with_sinks_compiled_by_inductor_is_the_reference():
    """The first row of each sequence (a sink) in 8-bit codes with its own step, the rest in 4-bit."""
    x = torch.randn(3, 11, 40) * 4
    x[:, 0] *= 100
    sinks = torch.zeros(3, 11, 1, dtype=torch.bool)
    sinks[:, 0] = True
    step = torch.where(sinks, torch.tensor(3.1), torch.tensor(0.6))
    compiled = torch.compile(ops.quantize_math, fullgraph=True)
    codes = compiled(x, step, 4, "int", sinks, 8)
    assert torch.equal(codes, reference.quantize_per_tensor_ref(x, step, 4, "int", sinks, 8))
    assert codes[:, 1:].abs().max() == 8 and codes[:, 0].abs().max() > 100


@pytest.mark.parametrize("n", [12, 576, 1536])
def test_rotate_decomposition_compiled_by_inductor_matches_the_op(n):
    factors = rotation.rotation_factors(n)
    x = torch.randn(7, n)
    compiled = torch.compile(rotation.rotate_decomposed, fullgraph=True)
    torch.testing.assert_close(compiled(x, factors), q4.rotate(x, factors), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_sees_every_q4_op_as_aten_and_the_integer_gemm_stays(llama, monkeypatch):
    _, eager_out, art = compile_and_run(llama, {"lower": "eager", "progress": False, "recipe": "w4a4",
                                                "calibration": [(ids(16, seed=2),)]}, ids(12))
    gm = art.graph_module
    FileCheck().check("q4.rotate").check("q4.quantize_per_tensor").run(gm.code)
    # 12 static rows: decode-sized, the linears call the q4_cpu kernel
    lowered = make_fx(gm, decomposition_table=lowering.DECOMPOSITIONS)(ids(12))
    assert "q4." not in lowered.code and "_int_mm" not in lowered.code, lowered.code
    FileCheck().check("q4_cpu.linear_w4a4").run(lowered.code)
    # above the threshold (prefill), the unpack + integer GEMM decomposition
    monkeypatch.setattr(cpu_kernels, "SMALL_M", 8)
    lowered = make_fx(gm, decomposition_table=lowering.DECOMPOSITIONS)(ids(12))
    assert "q4." not in lowered.code and "q4_cpu.linear" not in lowered.code, lowered.code
    FileCheck().check("aten._int_mm").run(lowered.code)
    monkeypatch.undo()

    _, inductor_out, _ = compile_and_run(llama, {"lower": "inductor", "progress": False, "recipe": "w4a4",
                                                 "calibration": [(ids(16, seed=2),)]}, ids(12))
    # the same integer codes but where float summation order moves a value across a rounding tie
    cosine = torch.nn.functional.cosine_similarity(inductor_out.logits.flatten(), eager_out.logits.flatten(), dim=0)
    assert cosine > 0.999, cosine


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (3, 64, 33), (17, 257, 100), (2, 9, lowering.GEMM_COLUMNS * 2 + 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_decomposition_compiled_by_inductor_is_the_op_bit_exactly(m, k, n, bias):
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g)
    packed = int4.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
    w_step, a_step = torch.rand(n, generator=g) + 0.01, torch.tensor(0.07)
    b = torch.randn(n, generator=g) if bias else None
    expected = q4.linear_w4a4(x, packed, w_step, a_step, b, torch.float32)
    assert torch.equal(lowering.unpack_decomposed(packed, k), int4.unpack_int4(packed, k))
    # the op in a graph, lowered the way the backend lowers its final graph
    gm = make_fx(lambda *args: q4.linear_w4a4(*args, torch.float32))(x, packed, w_step, a_step, b)
    compiled = lowering.lower(gm, [x, packed, w_step, a_step, b], "inductor", "auto", mode=None)
    got = compiled(x, packed, w_step, a_step, b)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("m", [3, 70])  # the q4_cpu kernel at decode, the GEMM decomposition above SMALL_M
def test_linear_decompositions_with_group_multipliers_compiled_by_inductor_are_the_ops(m):
    """The unpacking loop multiplies by the groups' multipliers (formats.apply_multipliers): the
    integer linear stays bit-exact, the weight-only one equal up to summation order."""
    g = torch.Generator().manual_seed(m)
    k, n = 96, lowering.GEMM_COLUMNS + 5  # two column blocks: each reads its rows of the multipliers
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    packed = int4.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
    w_mult = torch.randint(1, 16, (n, 3), dtype=torch.uint8, generator=g)
    w_step, a_step, b = torch.rand(n, generator=g) + 0.01, torch.tensor(0.07), torch.randn(n, generator=g)
    gm = make_fx(lambda *args: q4.linear_w4a4(*args, torch.float32, "int", w_mult))(x, packed, w_step, a_step, b)
    compiled = lowering.lower(gm, [x, packed, w_step, a_step, b], "inductor", "auto", mode=None)
    assert torch.equal(compiled(x, packed, w_step, a_step, b),
                       reference.linear_w4a4_ref(x, packed, w_step, a_step, b, torch.float32, "int", w_mult))
    xf = torch.randn(m, k, generator=g)
    gm = make_fx(lambda *args: q4.linear_w4a16(*args, torch.float32, w_mult))(xf, packed, w_step, b)
    compiled = lowering.lower(gm, [xf, packed, w_step, b], "inductor", "auto", mode=None)
    torch.testing.assert_close(compiled(xf, packed, w_step, b),
                               reference.linear_w4a16_ref(xf, packed, w_step, b, torch.float32, w_mult),
                               rtol=1e-5, atol=1e-3)


def test_triton_lowering_re_lays_the_weights_the_tiled_kernel_covers_and_leaves_the_rest_general():
    """kernels="triton": a linear whose K is a multiple of 64 (with group multipliers or not)
    runs the tuned kernel over its weight re-laid once (the stored layout no longer referenced);
    any other K falls back to the general kernel; both compute the reference's bits. The
    pipeline's graph module is not changed."""
    g = torch.Generator().manual_seed(11)

    def weight(n, k, groups=None):
        packed = int4.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
        mult = None if groups is None else torch.randint(1, 16, (n, groups), dtype=torch.uint8, generator=g)
        return packed, torch.rand(n, generator=g) + 0.01, mult

    a_step = torch.tensor(0.03)
    linears = [weight(40, 128), weight(40, 100), weight(40, 128, groups=4), weight(40, 192, groups=3),
               weight(40, 96, groups=3)]  # groups of 32 and 64 k; K = 96 not covered

    def f(x128, x100, x192, x96):
        inputs = (x128, x100, x128, x192, x96)
        return [q4.linear_w4a4(x, p, s, a_step, None, torch.float32, "int", m) for x, (p, s, m) in zip(inputs, linears)]

    xs = [torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g) for k in (128, 100, 192, 96)]
    gm = make_fx(f)(*xs)
    assert lowering.use_triton_kernels(gm, everywhere=False) is gm  # auto, on CPU: nothing runs Triton
    lowered = lowering.use_triton_kernels(gm, everywhere=True)
    targets = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    tiled_op, general = q4.linear_w4a4_tiled.default, q4.linear_w4a4_triton.default
    assert targets == [tiled_op, general, tiled_op, tiled_op, general]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [q4.linear_w4a4.default] * 5
    stored = {linears[i][0].data_ptr() for i in (0, 2, 3)}
    constants = [getattr(lowered, n.target) for n in lowered.graph.nodes if n.op == "get_attr"]
    assert not stored & {t.data_ptr() for t in constants}
    # three tiled weights [K/2, N]; the K = 96 weight stays in its stored layout [N, K/2]
    assert sorted(tuple(t.shape) for t in constants if t.dtype == torch.uint8 and t.shape[-1] >= 40) == [(40, 48), (40, 50), (64, 40),
                                                                                 (64, 40), (96, 40)]
    again = lowering.use_triton_kernels(gm, everywhere=True)  # another graph of the model, same weights
    tiled = [t for t in constants if t.dtype == torch.uint8 and t.shape[-1] == 40]
    assert all(any(t is u for u in again.buffers()) for t in tiled)  # one tiled copy, shared
    for got, x, (p, s, m) in zip(lowered(*xs), (xs[0], xs[1], xs[0], xs[2], xs[3]), linears):
        assert torch.equal(got, reference.linear_w4a4_ref(x, p, s, a_step, None, torch.float32, "int", m))


@pytest.mark.slow
def test_q4_kernels_triton_runs_the_triton_gemm_with_the_same_logits(llama, monkeypatch):
    """Q4_KERNELS=triton: the integer GEMMs run through the Triton kernels (the interpreter on CPU)
    and the model computes what it computes through the CPU kernels: the tuned kernel over the
    tiled layout where K is a multiple of 64 (q/k/v/o, gate/up: K = 64), the general kernel for
    the others (down_proj: K = 160)."""
    options = {"lower": "eager", "progress": False, "recipe": "w4a4-rtn", "calibration": [(ids(16, seed=2),)]}
    _, cpu_out, _ = compile_and_run(llama, options, ids(12))
    torch._dynamo.reset()
    monkeypatch.setenv("Q4_KERNELS", "triton")  # (tests/conftest.py turned Triton's interpreter on)
    from qcompile.kernels import triton_gemm, triton_tiled_gemm

    calls = []
    for module, name in ((triton_gemm, "linear_w4a4"), (triton_tiled_gemm, "linear_w4a4_tiled")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, name=name, original=original, **kw: calls.append(
            (name, a[0].shape[-1])) or original(*a, **kw))
    for lower in ("eager", "inductor"):
        calls.clear()
        _, out, art = compile_and_run(llama, {**options, "lower": lower}, ids(12))
        assert art.count_ops(q4.linear_w4a4.default) == 14  # the compiled graph is the pipeline's
        assert sorted(set(calls)) == [("linear_w4a4", 160), ("linear_w4a4_tiled", 64)], lower
        assert [name for name, _ in calls].count("linear_w4a4_tiled") == 12, lower
        assert len(calls) == 14, lower
        torch.testing.assert_close(out.logits, cpu_out.logits, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("recipe,producers", [
    ("w4a4-rtn", {"rsqrt", "silu", "transpose"}),  # the norm, the MLP's silu * up, attention's output copy
    ("w4a4", {"rotate"}),  # the online rotation's last stage (Hadamard and sinks: the default recipe)
])
def test_no_activation_quantize_runs_as_a_kernel_of_its_own(llama, monkeypatch, recipe, producers):
    """With the GEMMs opaque (kernels="triton": on a GPU each is one Triton launch), Inductor
    fuses every static activation quantize into the kernel that computes its input: a decode
    step has no quantize-only kernel (Inductor's C++ kernels here; its GPU scheduler fuses alike)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("Q4_KERNELS", "triton")
    torch._dynamo.reset()
    llama.forward = torch.compile(llama.forward, backend="q4", dynamic=False, options={
        "recipe": recipe, "calibration": [{"input_ids": ids(32, seed=2)}], "progress": False, "range_warning": False})
    # a compile Inductor's caches answered would bring back no code to read
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(lambda: llama(ids(1, seed=3)))
    import re

    kernels = set(re.findall(r"\b(cpp_fused_\w+?)_\d+ = ", codes[-1]))
    quantizing = [k for k in kernels if "quantize_per_tensor" in k]
    assert quantizing, kernels
    assert all(any(op in k for op in producers) for k in quantizing), quantizing
    assert "torch.ops.q4.quantize_per_tensor" not in codes[-1]  # no op call left for the quantize either
    torch._dynamo.reset()


def attention_graph(*inputs) -> torch.fx.GraphModule:
    """A graph of three ATen attention calls, with the shapes Inductor's lowering sees: float32
    with grouped key/value heads and a bool mask; float16; with dropout."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    sdpa = torch.ops.aten.scaled_dot_product_attention.default

    def f(q, k, v, mask):
        grouped = sdpa(q, k, v, mask, scale=0.2, enable_gqa=True)
        half = sdpa(q.half(), k.half(), v.half(), enable_gqa=True)
        dropped = sdpa(q, k, v, None, 0.5, enable_gqa=True)
        return grouped, half, dropped

    gm = torch.fx.symbolic_trace(f)
    FakeTensorProp(gm).propagate(*inputs)
    return gm


def test_cpu_attention_replaces_aten_attention_where_it_computes_it():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 6, 9, 32, generator=g), torch.randn(1, 2, 9, 32, generator=g), torch.randn(1, 2, 9, 32, generator=g)
    mask = torch.rand(1, 1, 9, 9, generator=g) > 0.3
    mask[..., 0] = True
    gm = attention_graph(q, k, v, mask)
    rewritten = lowering.use_cpu_attention(gm)
    targets = [str(n.target) for n in rewritten.graph.nodes if "attention" in str(n.target)]
    assert targets == ["q4_cpu.attention.default", "aten.scaled_dot_product_attention.default",
                       "aten.scaled_dot_product_attention.default"], targets
    assert [str(n.target) for n in gm.graph.nodes if "attention" in str(n.target)].count("q4_cpu.attention.default") == 0
    grouped = rewritten(q, k, v, mask)[0]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped, torch.ops.q4_cpu.attention(q, k, v, mask, False, 0.2))


def test_cpu_attention_reads_repeated_key_value_heads_from_their_source():
    """transformers' repeat_kv (unsqueeze, expand, reshape: a copy of each key/value head for its
    query heads) feeds q4_cpu.attention's grouped heads directly; the copies become dead code."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    def f(q, k, v):
        def repeat(x):  # x[:, :, None, :, :].expand(...).reshape(...), as traced: whole-axis slices too
            x = torch.ops.aten.slice.Tensor(torch.ops.aten.unsqueeze.default(x, 2), 3, 0, 9223372036854775807)
            return torch.ops.aten.reshape.default(torch.ops.aten.expand.default(x, [1, 2, 3, 9, 32]), [1, 6, 9, 32])
        return torch.ops.aten.scaled_dot_product_attention.default(q, repeat(k), repeat(v), is_causal=True)

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 6, 9, 32, generator=g), torch.randn(1, 2, 9, 32, generator=g), torch.randn(1, 2, 9, 32, generator=g)
    gm = torch.fx.symbolic_trace(f)
    FakeTensorProp(gm).propagate(q, k, v)
    rewritten = lowering.use_cpu_attention(gm)
    (attention,) = [n for n in rewritten.graph.nodes if n.target is torch.ops.q4_cpu.attention.default]
    assert attention.kwargs["key"].name == "k" and attention.kwargs["value"].name == "v"
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(rewritten(q, k, v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_is_told_the_constants_and_the_static_kv_cache_keep_their_address(llama, monkeypatch):
    """For CUDA graphs: a q4 graph's constants (lifted to the first inputs) and the static cache's
    tensors, which the decode step writes in place, are static inputs (not copied at each replay;
    a graph writing the cache is not skipped); the tokens and positions are not."""
    from torch._inductor import compile_fx as inductor
    from transformers import StaticCache

    from qcompile.backends import q4 as q4_backend

    told = []
    inner = inductor.compile_fx_inner
    monkeypatch.setattr(inductor, "compile_fx_inner", lambda gm, inputs, **kwargs: told.append(
        (len(inputs), set(kwargs["static_input_idxs"]))) or inner(gm, inputs, **kwargs))
    torch._dynamo.reset()
    llama.forward = torch.compile(llama.forward, backend="q4", dynamic=False, options={
        "recipe": "w4a4-rtn", "calibration": [{"input_ids": ids(32, seed=2)}], "progress": False})
    cache = StaticCache(config=llama.config, max_cache_len=12)
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        llama(input_ids=ids(8, seed=3), past_key_values=cache, cache_position=torch.arange(8))
        llama(input_ids=ids(1, seed=4), past_key_values=cache, cache_position=torch.tensor([8]))
    graphs = q4_backend.compiled_graphs()[-2:]
    assert len(told) == 2  # the prompt's graph (it creates the cache) and the decode step's
    decode = graphs[1].graph_module
    inputs = [p.meta["val"] for p in decode.graph.find_nodes(op="placeholder")]
    kv = {i for i, t in enumerate(inputs) if t.dim() == 4}
    assert len(kv) == 2 * 2 and kv <= lowering.written_inputs(decode)  # keys and values of two layers
    count, static = told[1]
    constants = count - len(inputs)
    assert constants > 14  # the packed weights and their steps
    assert static >= set(range(constants)) | {constants + i for i in kv}
    assert constants + 0 not in static  # the new token moves
    torch._dynamo.reset()
