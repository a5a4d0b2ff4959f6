"""migrate-scales: the migrated graph computes the same function, on every architecture family."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import weights
from tests.helpers.models import Planted, inputs, tiny_model
from tests.helpers.passes import capture_family, first_output, run_pass

# (family, groups migrated per 2 layers: the norms before attention and MLP; down_proj through
# up_proj rows where the MLP is gated with separate gate and up linears; o_proj through a
# multiply of its own on attention's output)
FAMILIES = [("llama", 8), ("qwen2", 8), ("gemma", 8), ("phi3", 6), ("opt", 6), ("bert", 2)]


@pytest.mark.parametrize("family,groups", FAMILIES)
def test_migration_is_exact_in_real_arithmetic(family, groups):
    x = inputs()
    gm = capture_family(family, x)
    before = first_output(gm, x).detach().clone()
    result, stats = run_pass("migrate-scales", gm, alpha=0.8)
    after = first_output(result.graph_module, x)
    assert stats["groups-migrated"] == groups
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel <= 1e-4, rel


def test_post_norm_residual_is_left_alone_and_counted():
    gm = capture(tiny_model("bert"), inputs())
    _, stats = run_pass("migrate-scales", gm)
    assert stats["groups-migrated"] == 2  # only the attention output dense, through value rows
    assert stats["activations-shared-with-non-linear"] >= 4  # LayerNorm outputs feed residuals too


@pytest.mark.slow
def test_attention_output_is_migrated_whether_or_not_the_kv_cache_is_returned():
    """o_proj's scale is a multiply of its own, so v_proj (whose output the returned cache
    holds) is untouched by it: the cache keeps the model's own values, and prefill and decode
    graphs migrate alike."""
    _, with_cache = run_pass("migrate-scales", capture(tiny_model("llama"), inputs()))
    _, without = run_pass("migrate-scales", capture_family("llama", inputs()))
    assert with_cache["groups-migrated"] == 8 and without["groups-migrated"] == 8


def test_attention_output_scale_is_one_multiply_and_v_proj_keeps_its_rows():
    from qcompile.core import ir

    gm = capture_family("llama", inputs())  # 4 query heads share 2 KV heads of 16 channels
    run_pass("migrate-scales", gm, method="smoothquant")
    o = next(n for n in gm.graph.nodes if ir.module_path(n).endswith("layers.0.self_attn.o_proj"))
    v = next(n for n in gm.graph.nodes if ir.module_path(n).endswith("layers.0.self_attn.v_proj"))
    model = tiny_model("llama")
    s = weights.value(gm, o.args[1])[0] / model.model.layers[0].self_attn.o_proj.weight[0]
    scaled = o.args[0]
    assert scaled.target is torch.ops.aten.mul.Tensor
    torch.testing.assert_close(ir.get_constant(gm, scaled.args[1]), 1 / s)  # o_proj's input * (1 / s)
    assert not torch.allclose(s, torch.ones_like(s))  # one scale per channel, not per KV head
    # v_proj's columns carry only the input norm's migration: a common factor for every row of a column
    t = model.model.layers[0].self_attn.v_proj.weight / weights.value(gm, v.args[1])
    torch.testing.assert_close(t, t[:1].expand_as(t))


def test_migrated_scales_are_changed_norms_and_weight_expressions_not_new_multiplies():
    gm = capture_family("llama", inputs())
    muls_before = gm.code.count("aten.mul.Tensor")
    buffers_before = dict(gm.named_buffers())
    result, stats = run_pass("migrate-scales", gm)
    gm = result.graph_module
    expressions = [n for n in gm.graph.nodes if weights.is_expression(n)]
    activation_muls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor and n not in expressions]
    assert len(activation_muls) == muls_before + 2  # but for o_proj's input, one a layer
    assert stats["linears-migrated"] == 14  # every linear of both layers
    # each linear's weight: W * s (gate/up: W_up / s[:, None] first), computed when read
    assert len(expressions) == 14 + 2
    FileCheck().check("input_layernorm_weight_migrated").check("q_proj_weight_migrated = ").check(
        "aten.mul.Tensor(model_layers_0_self_attn_q_proj_weight, ").run(gm.code)
    # no migrated copy of a weight: the new constants are vectors (the norms', the scales)
    new = {name: b for name, b in gm.named_buffers() if name not in buffers_before}
    assert new and all(b.dim() == 1 or 1 in b.shape for b in new.values()), [(n, b.shape) for n, b in new.items()]


def test_calibration_stats_follow_the_migration():
    from qcompile.core import ir

    gm = capture(tiny_model("llama"), inputs())
    q = next(n for n in gm.graph.nodes if ir.module_path(n).endswith("layers.0.self_attn.q_proj"))
    absmax_before = q.meta[ir.CALIB].absmax.clone()
    run_pass("migrate-scales", gm, method="smoothquant", alpha=1.0)
    absmax_after = q.meta[ir.CALIB].absmax
    # alpha = 1 moves the whole activation range: every channel's range becomes the same
    assert absmax_after.std() / absmax_after.mean() < 1e-3 < absmax_before.std() / absmax_before.mean()


def test_qsm_search_beats_round_to_nearest_on_planted_outliers():
    """A 300x outlier channel ruins a per-tensor int4 step; QSM moves it into the weights.

    As in real LLMs, the outlier channel's weights are small, so every channel matters to the
    output: round-to-nearest zeroes the 15 ordinary channels, QSM keeps them."""
    model = Planted().eval()
    with torch.no_grad():
        model.a.weight[:, 3] /= 300
    calib, held_out = torch.randn(256, 16), torch.randn(64, 16)
    expected = model(held_out)

    def error(pipeline):
        gm = capture(model, calib)
        for name, options in pipeline:
            gm = run_pass(name, gm, **options)[0].graph_module
        return (gm(held_out)[0] - expected).pow(2).mean().item()

    rtn = error([("insert-quantizers", {})])
    qsm = error([("migrate-scales", {}), ("insert-quantizers", {})])
    assert qsm < rtn / 10, (qsm, rtn)


def test_qsm_leaves_its_clipping_ratio_for_insert_quantizers():
    from qcompile.algorithms.scale_search import CLIPS
    from qcompile.core import ir

    gm = capture(tiny_model("llama"), inputs())
    run_pass("migrate-scales", gm)
    clips = [n.meta[ir.ACT_CLIP] for n in gm.graph.nodes if ir.ACT_CLIP in n.meta]
    assert len(clips) == 14 and all(c in CLIPS for c in clips)  # every linear of both layers


def test_fold_scales_keeps_the_attention_output_scale():
    """fold-scales folds constant multiplies into the reading linear, except where migrated scales
    live: folding o_proj's 1/s back into its weight would undo the migration."""
    from qcompile.core import ir

    gm = capture_family("llama", inputs())
    run_pass("migrate-scales", gm, method="smoothquant")
    result, stats = run_pass("fold-scales", gm)
    kept = [n for n in result.graph_module.graph.nodes if n.meta.get(ir.MIGRATION_SCALE)]
    assert len(kept) == 2 and all(n.users for n in kept)  # one a layer, still read by o_proj


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_power_of_two_scales_are_exact_and_only_change_exponents(family):
    """power-of-two=true (LLM-FP4's pre-shifted exponent bias): every scale is a power of two, so a
    migrated weight's mantissas are the model's own, and the function is unchanged."""
    from qcompile.core import ir

    x = inputs()
    gm = capture_family(family, x)
    before = first_output(gm, x).detach().clone()
    originals = {n.meta.get(ir.FQN): ir.get_constant(gm, n).clone() for n in gm.graph.nodes
                 if n.op == "get_attr" and ir.get_constant(gm, n).dim() == 2}  # the linears' weights
    result, stats = run_pass("migrate-scales", gm, method="smoothquant", alpha=1.0, power_of_two=True)
    assert stats["groups-migrated"] > 0
    after = first_output(result.graph_module, x)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-6
    migrated = 0
    for node in result.graph_module.graph.nodes:
        stem = node.meta.get(ir.FQN)
        if weights.is_expression(node) and stem in originals and node.name.endswith("_migrated"):
            ratio = weights.value(result.graph_module, node) / originals[stem]
            exponent = torch.log2(ratio[originals[stem] != 0])
            assert torch.equal(exponent, exponent.round()), stem
            migrated += 1
    assert migrated > 0
