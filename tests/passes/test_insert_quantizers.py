"""insert-quantizers: before/after IR on a two-linear module, and what the rewritten graph computes."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.algorithms import gptq, scale_search
from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.core.pass_api import PipelineError
from qcompile.core.printer import format_graph
from qcompile.kernels import formats, reference
from tests.helpers.models import Experts, Positioned, TwoHeads, Zero, expert_inputs, experts_case
from tests.helpers.passes import run_pass


def test_before_after_ir():
    x = torch.randn(2, 3, 16)
    gm = capture(TwoHeads().eval(), x)
    FileCheck().check_count("aten.linear.default", 3, exactly=True).check_not("q4.").run(gm.code)

    result, stats = run_pass("insert-quantizers", gm)

    assert result.modified
    # q and k read the same normalized activation: one quantize node serves both
    (FileCheck()
        .check("aten.layer_norm")
        .check_count("q4.quantize_per_tensor.default", 1, exactly=True)
        .check_count("q4.dequantize_weight_int4.default", 2, exactly=True)
        .check("aten.add")
        .check("q4.quantize_per_tensor.default")
        .check("q4.dequantize_weight_int4.default")
        .check("aten.linear.default")
        .run(result.graph_module.code))
    assert stats["linears-quantized"] == 3 and stats["quantizers-shared"] == 1
    # the fp32 weights are gone: only packed uint8 codes and float32 steps remain for linears
    buffers = dict(result.graph_module.named_buffers())
    assert not {"q_weight", "k_weight", "out_weight"} & set(buffers), sorted(buffers)
    assert all(b.dtype == torch.uint8 for n, b in buffers.items() if n.endswith("_packed"))


def test_rewritten_graph_is_the_fake_quant_reference():
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 16)
    gm = capture(model, x)
    result, _ = run_pass("insert-quantizers", gm)
    got = result.graph_module(x)[0]

    with torch.no_grad():
        h = model.norm(x)
        step_h = h.abs().max() / 7
        q = reference.fake_quant_linear_ref(h, model.q.weight, model.q.bias, step_h)
        k = reference.fake_quant_linear_ref(h, model.k.weight, None, step_h)
        s = q + k
        # calibration saw the float model: the step of `out` comes from the float sum
        step_s = (model.q(h) + model.k(h)).abs().max() / 7
        expected = reference.fake_quant_linear_ref(s, model.out.weight, model.out.bias, step_s)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_skip_keeps_matching_linears_in_float():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    result, stats = run_pass("insert-quantizers", gm, skip="^out$")
    assert stats["linears-quantized"] == 2 and stats["linears-left-in-float"] == 1
    FileCheck().check("q4.quantize_per_tensor").check("aten.add").check_not("q4.").run(result.graph_module.code)


@pytest.mark.parametrize("options", [{}, {"w_format": "search", "a_format": "search", "search_clip": True},
                                     {"activations": "dynamic"}])
def test_all_zero_activation_and_weight_rows_get_finite_steps_and_are_counted(options):
    model = Zero().eval()
    with torch.no_grad():
        model.lin.weight[1] = 0  # a weight row of zeros too
    gm = capture(model, torch.randn(2, 4))
    result, stats = run_pass("insert-quantizers", gm, **options)
    assert stats["steps-fallback"] == 1
    out = result.graph_module(torch.randn(2, 4))[0]
    assert torch.isfinite(out).all()
    steps = [b for name, b in result.graph_module.named_buffers() if name.endswith("_step")]
    assert steps and all(bool(torch.isfinite(b).all() and (b > 0).all()) for b in steps)


def test_two_runs_give_different_linears_different_bits():
    """`only` limits a run to some linears; a later run leaves them alone (w4a4's 8-bit head)."""
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    first, stats = run_pass("insert-quantizers", gm, only="^out$", a_bits=8)
    assert stats["linears-quantized"] == 1 and stats["linears-left-in-float"] == 0
    second, stats = run_pass("insert-quantizers", first.graph_module)
    assert stats["linears-quantized"] == 2 and stats["linears-left-in-float"] == 0
    quantizers = [n for n in second.graph_module.graph.nodes if n.target is torch.ops.q4.quantize_per_tensor.default]
    assert sorted(n.args[2] for n in quantizers) == [4, 8]  # q/k share one 4-bit quantize; out has 8 bits
    assert not any(ir.FLOAT_REASON in n.meta for n in second.graph_module.graph.nodes)


def test_each_linear_records_the_run_that_took_it():
    """`q4_quantized` meta: bits, rounding, weight method, clipping ratio and the run's full spec."""
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    first, _ = run_pass("insert-quantizers", gm, only="^out$", a_bits=8)
    second, _ = run_pass("insert-quantizers", first.graph_module, rounding=False)
    records = {ir.linear_module_path(n): n.meta[ir.QUANTIZED] for n in second.graph_module.graph.nodes
               if ir.QUANTIZED in n.meta and n.target is ir.aten.linear.default}
    assert records["out"] == ir.QuantizedBy(
        w_bits=4, a_bits=8, rounded=True, weights="rtn", act_clip=1.0,
        run="insert-quantizers{w-bits=4,a-bits=8,skip=lm_head,only=^out$,search-clip=false,"
            "unmatched=quantize,rounding=true,weights=rtn,w-format=int,a-format=int,low-rank=0,activations=static,sinks=false,sink-bits=8,w-group=0}")
    # a rounding=false run takes q and k without changing them: the record says so
    assert records["q"] == records["k"] == ir.QuantizedBy(4, 4, False, "rtn", None, records["q"].run)
    assert "rounding=false" in records["q"].run
    # ... and a weight-only run has no activation clipping ratio
    weight_only, _ = run_pass("insert-quantizers", capture(TwoHeads().eval(), torch.randn(2, 3, 16)), a_bits=16)
    assert {n.meta[ir.QUANTIZED].act_clip for n in weight_only.graph_module.graph.nodes
            if ir.QUANTIZED in n.meta and n.target is ir.aten.linear.default} == {None}


def test_fuse_kernels_keeps_the_record():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    result, _ = run_pass("insert-quantizers", gm, skip="")
    result, _ = run_pass("fuse-kernels", result.graph_module)
    fused = [n for n in result.graph_module.graph.nodes if n.target is torch.ops.q4.linear_w4a4.default]
    assert len(fused) == 3 and all(n.meta[ir.QUANTIZED].rounded for n in fused)


# --- LLM-FP4's 4-bit float formats ------------------------------------------------------------------


def test_float_formats_before_after_ir():
    """w-format / a-format: the format rides on the quantize and the weight's dequantize as their
    last argument; fuse-kernels hands the weight's to the integer kernel."""
    x = torch.randn(2, 3, 16)
    model = TwoHeads().eval()
    result, stats = run_pass("insert-quantizers", capture(model, x), w_format="e2m1", a_format="e3m0")
    assert stats["linears-quantized"] == 3 and stats["formats-searched"] == 0
    (FileCheck()
        .check("q4.quantize_per_tensor.default(layer_norm, q_weight_a_step, 4, 'e3m0')")
        .check("q4.dequantize_weight_int4.default(q_weight_packed, q_weight_step, 16, torch.float32, 'e2m1')")
        .check("q4.quantize_per_tensor.default(add, out_weight_a_step, 4, 'e3m0')")
        .run(result.graph_module.code))
    got = result.graph_module(x)[0]
    with torch.no_grad():  # the fake-quant semantics, written out with the formats
        h = model.norm(x)

        def fake(x, linear, step):
            x_dq = formats.round_to_format(x / step, "e3m0") * step
            values, w_step = formats.quantize_weight_per_channel(linear.weight, "e2m1")
            return torch.nn.functional.linear(x_dq, values * w_step[:, None], linear.bias)

        s = fake(h, model.q, h.abs().max() / 64) + fake(h, model.k, h.abs().max() / 64)
        expected = fake(s, model.out, (model.q(h) + model.k(h)).abs().max() / 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    fused, stats = run_pass("fuse-kernels", result.graph_module)
    assert stats["linears-fused"] == 3
    FileCheck().check_count("q4.linear_w4a4.default(", 3, exactly=True).check("'e2m1')").run(fused.graph_module.code)
    torch.testing.assert_close(fused.graph_module(x)[0], got, rtol=1e-5, atol=1e-5)
    assert "FP4 e2m1/e3m0 int" in format_graph(fused.graph_module)


def test_format_search_takes_the_format_with_the_least_output_error():
    """w-format=search,a-format=search: per linear, LLM-FP4's alternating search over E2M1, E3M0,
    E1M2 and the clipping ratio; the choice is in the record. Planted: a weight whose rows are
    powers of two (exact in E3M0 only) and activations on a uniform grid of 15 levels (exact in
    E1M2 only) make one pair error-free; the search finds it, and its error is that pair's."""
    model = TwoHeads().eval()
    gm = capture(model, torch.randn(2, 3, 16))
    result, stats = run_pass("insert-quantizers", gm, w_format="search", a_format="search", search_clip=True)
    assert stats["formats-searched"] == 3
    records = [n.meta[ir.QUANTIZED] for n in result.graph_module.graph.nodes if ir.QUANTIZED in n.meta]
    assert all(r.w_format in formats.FLOAT_FORMATS and r.a_format in formats.FLOAT_FORMATS for r in records)

    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (8, 16), generator=g) * 2 - 1
    weight = (signs * 2.0 ** torch.randint(-6, 1, (8, 16), generator=g)).float()
    weight[:, 0] = 1.0  # each row's largest magnitude is 1: its step maps it onto E3M0's 64
    x = torch.randint(-7, 8, (64, 16), generator=g).float() * 0.1
    x[0, 0] = 0.7  # the largest |x|: the step maps it onto E1M2's 7
    everything = list(formats.FLOAT_FORMATS)
    w_fmt, a_fmt, clip, error = scale_search.search_formats(x, weight, everything, everything, scale_search.CLIPS, 4, 4)
    assert (w_fmt, a_fmt, clip) == ("e3m0", "e1m2", 1.0)
    assert error <= 1e-6 * (x @ weight.t()).pow(2).sum().item()
    assert error == scale_search.search_formats(x, weight, [w_fmt], [a_fmt], [clip], 4, 4)[3]


@pytest.mark.parametrize("options,message", [
    ({"w_format": "e2m1", "w_bits": 3}, "w-format=e2m1 is a 4-bit float format: it needs w-bits=4"),
    ({"a_format": "search", "a_bits": 8}, "a-format=search is a 4-bit float format: it needs a-bits=4"),
    ({"a_format": "fp4"}, "'fp4' is not one of: int, e2m1, e3m0, e1m2, search"),
])
def test_bad_format_options_are_pipeline_errors(options, message):
    with pytest.raises(PipelineError, match=message):
        run_pass("insert-quantizers", capture(TwoHeads().eval(), torch.randn(2, 3, 16)), **options)


def test_dynamic_activations_before_after_ir():
    """activations=dynamic: a q4.token_steps per activation gives each token its step at run time;
    the quantize, the dequantize and, after fuse-kernels, the integer kernel read it."""
    x = torch.randn(2, 3, 16)
    model = TwoHeads().eval()
    result, stats = run_pass("insert-quantizers", capture(model, x), activations="dynamic")
    assert stats["linears-quantized"] == 3 and stats["quantizers-shared"] == 1
    (FileCheck()
        .check("q4.token_steps.default(layer_norm, 4, 1.0)")
        .check("q4.quantize_per_tensor.default(layer_norm, token_steps_default, 4)")
        .check("q4.dequantize_per_tensor.default(quantize_per_tensor_default, token_steps_default")
        .check("q4.token_steps.default(add, 4, 1.0)")
        .run(result.graph_module.code))
    assert not any(n.endswith("_a_step") for n, _ in result.graph_module.named_buffers())  # no calibrated steps
    got = result.graph_module(x)[0]
    with torch.no_grad():  # the per-token fake-quant semantics
        h = model.norm(x)

        def fake(x, linear):
            step = reference.token_steps_ref(x, 4)
            x_dq = reference.quantize_per_tensor_ref(x, step, 4).float() * step
            codes, w_step = formats.quantize_weight_per_channel(linear.weight, "int")
            return torch.nn.functional.linear(x_dq, codes * w_step[:, None], linear.bias)

        expected = fake(fake(h, model.q) + fake(h, model.k), model.out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fused, _ = run_pass("fuse-kernels", result.graph_module)
    FileCheck().check("q4.linear_w4a4.default(quantize_per_tensor_default, q_weight_packed, q_weight_step, "
                      "token_steps_default").run(fused.graph_module.code)
    torch.testing.assert_close(fused.graph_module(x)[0], got, rtol=1e-5, atol=1e-5)
    assert "W4A4 int dynamic" in format_graph(fused.graph_module)


def test_low_rank_compensation_before_after_ir_and_it_lowers_the_output_error():
    """low-rank=r (LoRC): two float linears on the quantizer's input, added to the quantized
    output; they stay float (a later run leaves them). Fitted through the Gram matrix, they lower
    the error the weights' rounding leaves (measured weight-only: with 4-bit activations their
    error adds to it, and on a model this small, signs of the two can cancel either way)."""
    model = TwoHeads().eval()
    x = torch.randn(4, 8, 16)
    gram = "insert-quantizers{weights=gptq}"  # the capture collects what that pipeline reads: Gram matrices
    plain, _ = run_pass("insert-quantizers", capture(model, x, pipeline=gram), weights="gptq")
    result, stats = run_pass("insert-quantizers", capture(model, x, pipeline=gram), weights="gptq", low_rank=4)
    assert stats["linears-compensated"] == 3 and stats["linears-quantized"] == 3
    code = result.graph_module.code
    (FileCheck()
        .check("q4.dequantize_weight_int4.default(q_weight_packed")
        .check("aten.linear.default(dequantize_per_tensor_default, dequantize_weight_int4_default, q_bias)")
        .check("aten.linear.default(layer_norm, q_weight_low_rank_b)")
        .check("aten.linear.default(linear_default_1, q_weight_low_rank_a)")
        .check("aten.add.Tensor(linear_default, linear_default_2)")
        .run(code))
    low = [n for n in result.graph_module.graph.nodes if ir.LOW_RANK in n.meta]
    assert len(low) == 6 and all(ir.FLOAT_REASON in n.meta and ir.QUANTIZED not in n.meta for n in low)
    assert tuple(dict(result.graph_module.named_buffers())["q_weight_low_rank_a"].shape) == (8, 4)
    again, again_stats = run_pass("insert-quantizers", result.graph_module)  # a later run: nothing left to take
    assert again_stats["linears-quantized"] == 0 and again_stats["linears-left-in-float"] == 0
    fused, _ = run_pass("fuse-kernels", result.graph_module)
    torch.testing.assert_close(fused.graph_module(x)[0], result.graph_module(x)[0], rtol=1e-5, atol=1e-5)

    expected = model(x)
    error = lambda gm: (gm(x)[0] - expected).pow(2).sum().item()  # noqa: E731
    weight_only = {"weights": "gptq", "a_bits": 16}
    plain, _ = run_pass("insert-quantizers", capture(model, x, pipeline=gram), **weight_only)
    compensated, _ = run_pass("insert-quantizers", capture(model, x, pipeline=gram), **weight_only, low_rank=4)
    assert error(compensated.graph_module) < 0.7 * error(plain.graph_module)


def test_low_rank_compensation_fits_the_error_through_the_gram_matrix():
    """With rank K the compensation is exact; with rank r it is the best rank-r fit of the output
    error ||X E^T||: no rank-r term does better than its, a random one does worse."""
    from qcompile.algorithms import gptq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g) * torch.linspace(0.1, 3, 12)
    error = torch.randn(7, 12, generator=g)
    gram = x.t() @ x
    a, b = gptq.low_rank_compensation(error, gram, 12)
    torch.testing.assert_close(a @ b, error, rtol=1e-4, atol=1e-4)
    a, b = gptq.low_rank_compensation(error, gram, 3)
    assert a.shape == (7, 3) and b.shape == (3, 12)
    left = (x @ (error - a @ b).t()).pow(2).sum()
    plain_u, plain_s, plain_v = torch.linalg.svd(error)  # the unweighted rank-3 fit (LoRC without the input)
    plain = (x @ (error - (plain_u[:, :3] * plain_s[:3]) @ plain_v[:3]).t()).pow(2).sum()
    assert left < plain and left < (x @ error.t()).pow(2).sum()


def _with_sinks(batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, positions) of sequences from their start whose first token is an attention sink:
    200 times the others' scale, as in SmolLM2's down_proj inputs."""
    x = torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 200
    return x, torch.arange(tokens)[None]


def test_sinks_before_after_ir_and_semantics():
    """sinks=true: the graph's positions (what the cos reads) mark each sequence's first token,
    whose codes are 8-bit with the step its calibration rows ask; the other tokens keep 4-bit codes
    with a step their own range asks, no longer stretched by the first token's."""
    model = Positioned().eval()
    x, positions = _with_sinks(2, 7, seed=1)
    gm = capture(model, x, positions, calibration=[_with_sinks(2, 7, seed=s) for s in (1, 2)])
    result, stats = run_pass("insert-quantizers", gm, sinks="true")
    assert stats["linears-with-sinks"] == 3 and stats["linears-without-sinks"] == 0
    (FileCheck()
        .check("aten.eq.Scalar(unsqueeze, 0)")
        .check("aten.expand_as.default(eq_scalar")
        .check("aten.where.self(expand_as_default, q_weight_sink_step, q_weight_a_step)")
        .check("q4.quantize_per_tensor.default(add, where_self, 4, 'int', expand_as_default, 8)")
        .check("aten.where.self(expand_as_default, out_weight_sink_step, out_weight_a_step)")
        .run(result.graph_module.code))
    steps = dict(result.graph_module.named_buffers())
    with torch.no_grad():
        h = model.norm(x) + torch.cos(positions[:, :, None].float() * model.inv_freq)
        calibrated = torch.cat([model.norm(c) + torch.cos(p[:, :, None].float() * model.inv_freq)
                                for c, p in (_with_sinks(2, 7, seed=s) for s in (1, 2))])
    assert steps["q_weight_sink_step"] == calibrated[:, 0].abs().max() / 127
    assert steps["q_weight_a_step"] == calibrated[:, 1:].abs().max() / 7
    # the graph computes the fake-quant semantics: 8-bit codes at position 0, 4-bit elsewhere
    got = result.graph_module(x, positions)[0]

    def fake(inp, linear, stem):
        sinks = (positions == 0)[:, :, None].expand(*inp.shape[:-1], 1)
        step = torch.where(sinks, steps[f"{stem}_sink_step"], steps[f"{stem}_a_step"])
        codes = reference.quantize_per_tensor_ref(inp, step, 4, "int", sinks, 8)
        assert codes[:, 0].int().abs().max() >= 100 and codes[:, 1:].int().abs().max() <= 8
        w_codes, w_step = formats.quantize_weight_per_channel(linear.weight, "int")
        return torch.nn.functional.linear(codes.float() * step, w_codes * w_step[:, None], linear.bias)

    with torch.no_grad():  # q and k share one quantizer (named after q's weight)
        expected = fake(fake(h, model.q, "q_weight") + fake(h, model.k, "q_weight"), model.out, "out_weight")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    fused, _ = run_pass("fuse-kernels", result.graph_module)
    torch.testing.assert_close(fused.graph_module(x, positions)[0], got, rtol=1e-5, atol=1e-5)
    assert "first token 8-bit" in format_graph(fused.graph_module)
    # a decode step (one token at position 5) takes the others' step through the fused kernel
    later = x[:, 3:4], torch.tensor([[5]])
    torch.testing.assert_close(fused.graph_module(*later)[0], result.graph_module(*later)[0], rtol=1e-5, atol=1e-5)


def test_sinks_need_positions_and_say_so():
    """A graph without rotary positions keeps one step for every token, and each linear says why."""
    x = torch.randn(2, 3, 16)
    result, stats = run_pass("insert-quantizers", capture(TwoHeads().eval(), x), sinks="true")
    assert stats["linears-with-sinks"] == 0 and stats["linears-without-sinks"] == 3
    assert "aten.where" not in result.graph_module.code
    linear = next(n for n in result.graph_module.graph.nodes if ir.SINKS in n.meta)
    assert linear.meta[ir.SINKS] == "none: the graph has no token positions"


def test_sink_bits_below_a_bits_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="sink-bits=4 is below a-bits=8"):
        run_pass("insert-quantizers", None, sinks="true", sink_bits="4", a_bits="8")


class GroupedPair(torch.nn.Module):
    """norm -> up (K = 64: two groups of 32) -> down (K = 40: no group fits) ."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.norm = torch.nn.LayerNorm(64)
        self.up = torch.nn.Linear(64, 40)
        self.down = torch.nn.Linear(40, 64, bias=False)
        with torch.no_grad():  # the first group's columns 20x the second's: one step a row fits neither
            self.up.weight.copy_(torch.randn(40, 64, generator=g) * torch.tensor([20.0] * 32 + [1.0] * 32))

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def test_weight_groups_before_after_ir_and_semantics():
    """w-group=32: a weight whose K holds whole groups gets uint8 multipliers beside its packed
    codes (one step per group: an integer multiple of the row's), read by the dequantize and,
    after fuse-kernels, by the integer kernel; another keeps one step a row, counted."""
    model, x = GroupedPair().eval(), torch.randn(2, 5, 64)
    result, stats = run_pass("insert-quantizers", capture(model, x), w_group=32)
    assert stats["weights-grouped"] == 1 and stats["weights-per-channel"] == 1 and stats["linears-quantized"] == 2
    gm = result.graph_module
    (FileCheck()
        .check("q4.dequantize_weight_int4.default(up_weight_packed, up_weight_step, 64, torch.float32, "
               "w_mult = up_weight_mult)")
        .check("q4.dequantize_weight_int4.default(down_weight_packed, down_weight_step, 40, torch.float32)")
        .run(gm.code))
    mult = dict(gm.named_buffers())["up_weight_mult"]
    assert mult.dtype == torch.uint8 and mult.shape == (40, 2) and not hasattr(gm, "down_weight_mult")
    assert int(mult[:, 0].min()) > int(mult[:, 1].max())  # the large group steps by more
    assert ir.QuantizedBy(4, 4, True, "rtn", 1.0, stats_run(gm), "int", "int", 32) == quantized_by(gm, "up")

    with torch.no_grad():  # the fake-quant semantics, grouped weight steps
        h = model.norm(x)
        codes, base, up_mult = gptq.quantize_grouped(model.up.weight, 32)
        up_w = reference.dequantize_weight_int4_ref(formats.pack(codes, "int"), base, 64, torch.float32, "int", up_mult)
        step_h = h.abs().max() / 7
        u = torch.relu(torch.nn.functional.linear(reference.dequantize_per_tensor_ref(
            reference.quantize_per_tensor_ref(h, step_h, 4), step_h, torch.float32), up_w, model.up.bias))
        step_u = torch.relu(model.up(h)).abs().max() / 7  # calibration saw the float model
        expected = reference.fake_quant_linear_ref(u, model.down.weight, None, step_u)
    torch.testing.assert_close(gm(x)[0], expected, rtol=1e-5, atol=1e-5)

    fused, _ = run_pass("fuse-kernels", gm)
    FileCheck().check("q4.linear_w4a4.default(quantize_per_tensor_default, up_weight_packed, up_weight_step, "
                      "up_weight_a_step, up_bias, torch.float32, w_mult = up_weight_mult)").run(fused.graph_module.code)
    torch.testing.assert_close(fused.graph_module(x)[0], expected, rtol=1e-5, atol=1e-5)
    assert "groups of 32 x" in format_graph(fused.graph_module)


def stats_run(gm):
    return next(n.meta[ir.QUANTIZED].run for n in gm.graph.nodes if ir.QUANTIZED in n.meta)


def quantized_by(gm, module):
    return next(n.meta[ir.QUANTIZED] for n in gm.graph.nodes
                if ir.QUANTIZED in n.meta and ir.module_path(n) == module)


def test_grouped_weights_lower_the_output_error_of_a_weight_with_uneven_columns():
    model, x = GroupedPair().eval(), torch.randn(4, 8, 64)
    expected = model(x)
    error = lambda gm: (gm(x)[0] - expected).pow(2).sum().item()  # noqa: E731
    weight_only = {"a_bits": 16, "only": "up"}  # down (no group fits its K) stays float
    per_row, _ = run_pass("insert-quantizers", capture(model, x), **weight_only)
    grouped, _ = run_pass("insert-quantizers", capture(model, x), **weight_only, w_group=32)
    # the large group keeps the row's step; the small one's weights, all rounded to 0 by it, now
    # round to codes of their own (measured: 0.65 of the error)
    assert error(grouped.graph_module) < 0.75 * error(per_row.graph_module)


@pytest.mark.parametrize("group", [-32, 16, 48])
def test_a_weight_group_that_is_not_a_multiple_of_32_is_a_pipeline_error(group):
    with pytest.raises(PipelineError, match=f"w-group must be 0 .* or a multiple of 32, got {group}"):
        run_pass("insert-quantizers", capture(GroupedPair().eval(), torch.randn(2, 3, 64)), w_group=group)


# --- a mixture of experts' grouped GEMMs -------------------------------------------------------------


def fake_quant_experts_ref(x, w, offs, a_step):
    """Expert by expert: F.linear of the fake-quantized rows and the expert's per-row rounded weight."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = reference.fake_quant_linear_ref(x[start:end], w[e], None, a_step)
        start = end
    return out


@pytest.mark.parametrize("aten", [False, True])
def test_grouped_expert_gemms_before_after_ir_and_semantics(aten):
    model, x, offs = experts_case(aten)
    gm = capture(model, x, offs)
    op = "aten._grouped_mm.default" if aten else "transformers.grouped_mm_fallback.default"
    FileCheck().check_count(op, 2, exactly=True).check_not("q4.").run(gm.code)

    result, stats = run_pass("insert-quantizers", gm)

    assert result.modified and stats["expert-gemms-quantized"] == 2 and stats["unhandled-ops-in-float"] == 0
    (FileCheck()
        .check("q4.quantize_per_tensor.default")
        .check("q4.dequantize_per_tensor.default")
        .check("q4.dequantize_weight_int4.default")
        .check("aten.view.default")
        .check("aten.transpose.int")
        .check(op)
        .check("q4.quantize_per_tensor.default")
        .check("q4.dequantize_weight_int4.default")
        .check(op)
        .run(result.graph_module.code))
    # the 3-D float weights are gone: the experts' rows stacked, packed, a step per row
    buffers = dict(result.graph_module.named_buffers())
    assert not {"gate_up_proj", "down_proj"} & set(buffers), sorted(buffers)
    assert buffers["gate_up_proj_packed"].shape == (3 * 16, 8) and buffers["gate_up_proj_step"].shape == (3 * 16,)
    assert buffers["down_proj_packed"].shape == (3 * 16, 4)
    if aten:
        return  # bf16: the semantics are checked in float32 (the same rewrite)
    with torch.no_grad():  # each expert's rows: its own fake-quant linear, one activation step for all
        gate, up = model.grouped_mm(x, model.gate_up_proj, offs).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        step_h = h.abs().max() / 7
        gate, up = fake_quant_experts_ref(x, model.gate_up_proj, offs, x.abs().max() / 7).chunk(2, dim=-1)
        expected = fake_quant_experts_ref(torch.nn.functional.silu(gate) * up, model.down_proj, offs, step_h)
    torch.testing.assert_close(result.graph_module(x, offs)[0], expected, rtol=1e-5, atol=1e-5)


def test_grouped_expert_gemms_weight_only_and_skipped():
    model = Experts().eval()
    x, offs = expert_inputs()
    result, stats = run_pass("insert-quantizers", capture(model, x, offs), a_bits=16)
    assert stats["expert-gemms-quantized"] == 2
    # weight-only: x as it is, the dequantized weight (each expert per row, round to nearest)
    (FileCheck().check_not("q4.quantize_per_tensor").check("q4.dequantize_weight_int4")
        .check("transformers.grouped_mm_fallback").run(result.graph_module.code))
    with torch.no_grad():
        def weight_only(h, w):
            codes, step = formats.quantize_weight_per_channel(w.reshape(-1, w.shape[-1]), "int", 4)
            w_dq = (codes.float() * step[:, None]).reshape(w.shape)
            return model.grouped_mm(h, w_dq, offs)

        gate, up = weight_only(x, model.gate_up_proj).chunk(2, dim=-1)
        expected = weight_only(torch.nn.functional.silu(gate) * up, model.down_proj)
    torch.testing.assert_close(result.graph_module(x, offs)[0], expected, rtol=1e-5, atol=1e-5)

    result, stats = run_pass("insert-quantizers", capture(model, x, offs), skip=".*")
    reasons = [n.meta.get(ir.FLOAT_REASON) for n in result.graph_module.graph.nodes if "grouped_mm" in str(n.target)]
    assert reasons == ["its module path matches skip='.*'"] * 2
    assert stats["unhandled-ops-in-float"] == 2 and stats["expert-gemms-quantized"] == 0


def test_grouped_expert_weights_stored_transposed_are_read_as_they_are():
    """A model whose experts' weights are stored [E, K, N] (transformers' is_transposed) passes
    them to the grouped GEMM untransposed: the same rewrite, the same numbers."""
    class Transposed(Experts):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(self.gate_up_proj.detach().transpose(-2, -1).contiguous())
            self.down_proj = torch.nn.Parameter(self.down_proj.detach().transpose(-2, -1).contiguous())

        def grouped_mm(self, x, w, offs):
            return torch.ops.transformers.grouped_mm_fallback(x, w, offs)

    x, offs = expert_inputs()
    plain = run_pass("insert-quantizers", capture(Experts().eval(), x, offs))[0].graph_module
    result, stats = run_pass("insert-quantizers", capture(Transposed().eval(), x, offs))
    assert stats["expert-gemms-quantized"] == 2
    torch.testing.assert_close(result.graph_module(x, offs)[0], plain(x, offs)[0], rtol=1e-5, atol=1e-5)
