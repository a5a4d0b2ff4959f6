"""migrate-scales: the migrated graph computes the same function, on every architecture family."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

from qcompile.testing import capture
from tests.conftest import tiny_model
from tests.passes.test_insert_quantizers import run_pass


def inputs(batch=2, seq=11, seed=3):
    return torch.randint(1, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def first_output(gm, x):
    out = gm(x)
    return out[0] if isinstance(out, (tuple, list)) else out


# (family, groups migrated: per layer the norms before attention and MLP, and down_proj through
# up_proj rows where the MLP is gated with separate gate and up linears)
FAMILIES = [("llama", 6), ("qwen2", 6), ("gemma", 6), ("phi3", 4), ("opt", 4), ("bert", 0)]


@pytest.mark.parametrize("family,groups", FAMILIES)
def test_migration_is_exact_in_real_arithmetic(family, groups):
    model = tiny_model(family)
    x = inputs()
    gm = capture(model, x)
    before = first_output(gm, x).detach().clone()
    result, stats = run_pass("migrate-scales", gm, alpha=0.8)
    after = first_output(result.graph_module, x)
    assert stats["groups-migrated"] == groups
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel <= 1e-4, rel


def test_post_norm_residual_is_left_alone_and_counted():
    gm = capture(tiny_model("bert"), inputs())
    _, stats = run_pass("migrate-scales", gm)
    assert stats["groups-migrated"] == 0
    assert stats["activations-shared-with-non-linear"] >= 4  # LayerNorm outputs feed residuals too


def test_migrated_scales_are_changed_constants_not_new_multiplies():
    gm = capture(tiny_model("llama"), inputs())
    muls_before = gm.code.count("aten.mul.Tensor")
    result, stats = run_pass("migrate-scales", gm)
    code = result.graph_module.code
    assert code.count("aten.mul.Tensor") == muls_before
    assert stats["linears-migrated"] == 12  # q, k, v, gate, up, down per layer; o_proj not yet
    FileCheck().check("input_layernorm_weight_migrated").check("q_proj_weight_migrated").run(code)
    # the user's parameter constants the migration replaced are gone from the graph module
    assert "model_layers_0_self_attn_q_proj_weight " not in code


def test_calibration_stats_follow_the_migration():
    from qcompile import ir

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
    from tests.passes.test_analyze_outliers import Planted

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
    from qcompile import ir
    from qcompile.search import CLIPS

    gm = capture(tiny_model("llama"), inputs())
    run_pass("migrate-scales", gm)
    clips = [n.meta[ir.ACT_CLIP] for n in gm.graph.nodes if ir.ACT_CLIP in n.meta]
    assert len(clips) == 12 and all(c in CLIPS for c in clips)
