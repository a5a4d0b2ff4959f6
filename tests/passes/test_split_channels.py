"""split-channels (MergeQuant's dimensional reconstruction): before/after IR, exactness in real
arithmetic on every family, statistics that follow the split, the choice by output error within
the budget, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.algorithms import split_channels
from qcompile.algorithms.metrics import max_relative_error
from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.core.pass_api import PipelineError
from qcompile.core.pipeline import parse_pipeline
from tests.helpers.models import inputs, tiny_llama
from tests.helpers.passes import capture_family, first_output, forced_split, run_pass

OUTLIER = 5  # the channel of layer 0's q/k/v input given a range 40 times the others'


def planted_graph():
    """A tiny Llama whose layer-0 attention input has one outlier channel (its norm weight x 40)."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[OUTLIER] *= 40
    x = inputs()
    return capture(model, x, use_cache=False), x


def q_proj(gm, layer: int = 0):
    return next(n for n in gm.graph.nodes if ir.module_path(n).endswith(f"layers.{layer}.self_attn.q_proj")
                and n.target is ir.aten.linear.default)


def test_before_after_ir_splits_the_planted_outlier_and_is_exact():
    gm, x = planted_graph()
    before = first_output(gm, x).detach().clone()
    result, stats = run_pass("split-channels", gm, budget=8)
    gm = result.graph_module
    assert result.modified and stats["groups-split"] >= 1 and 1 <= stats["channels-added"] <= 8 * stats["groups-split"]
    # q/k/v share one split: a multiply by 1 / copies, one gather, the weights' duplicated columns
    FileCheck().check("aten.mul.Tensor(").check("q_proj_split_multiplier").check("aten.index_select.default(") \
        .check("q_proj_split_index").check("q_proj_weight_split").check("aten.linear").run(gm.code)
    q = q_proj(gm)
    extra = q.meta[ir.SPLIT]
    assert q.args[0].target is ir.aten.index_select.default
    assert ir.get_constant(gm, q.args[1]).shape == (64, 64 + extra)
    index = ir.get_constant(gm, q.args[0].args[2])
    assert torch.equal(index[:64], torch.arange(64)) and (index[64:] == OUTLIER).any()
    assert max_relative_error(first_output(gm, x), before) <= 1e-4


def test_budget_zero_changes_nothing_and_a_negative_budget_is_refused():
    gm, x = planted_graph()
    code = gm.code
    result, stats = run_pass("split-channels", gm)  # budget 0, the default
    assert not result.modified and result.graph_module.code == code and stats["groups-split"] == 0
    with pytest.raises(PipelineError, match="budget must be >= 0"):
        parse_pipeline("split-channels{budget=-1}")


def test_statistics_follow_the_split_and_a_searched_clip_is_dropped():
    gm, _ = planted_graph()
    q = q_proj(gm)
    old = q.meta[ir.CALIB]
    q.meta[ir.ACT_CLIP] = 0.5  # as a migration search would have left it
    result, _ = run_pass("split-channels", gm, budget=8)
    q = q_proj(result.graph_module)
    new = q.meta[ir.CALIB]
    index = ir.get_constant(result.graph_module, q.args[0].args[2])
    multiplier = ir.get_constant(result.graph_module, q.args[0].args[0].args[1])
    torch.testing.assert_close(new.samples, (old.samples * multiplier)[:, index])
    torch.testing.assert_close(new.absmax, (old.absmax * multiplier)[index])
    assert new.absmax.max() < old.absmax.max() / 1.5  # the outlier's range is shared among its copies
    assert ir.ACT_CLIP not in q.meta


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "opt", "bert"])
def test_a_split_is_exact_in_real_arithmetic_on_every_family(family, monkeypatch):
    """Every group split (the three widest channels into 2, 3 and 4 copies), whatever the error
    says: the rewrite itself keeps each model's function."""
    monkeypatch.setattr(split_channels, "choose_split", forced_split)
    x = inputs()
    gm = capture_family(family, x)
    before = first_output(gm, x).detach().clone()
    groups = sum(1 for n in gm.graph.nodes if n.target is ir.aten.linear.default and ir.CALIB in n.meta)
    result, stats = run_pass("split-channels", gm, budget=6, skip="^$")
    assert stats["groups-split"] > 0 and stats["channels-added"] == 6 * stats["groups-split"]
    assert stats["linears-split"] == groups
    assert max_relative_error(first_output(result.graph_module, x), before) <= 1e-4


def test_fold_scales_folds_the_multiply_into_the_norm():
    gm, x = planted_graph()
    before = first_output(gm, x).detach().clone()
    for name, options in (("split-channels", {"budget": 8}), ("fold-scales", {})):
        gm = run_pass(name, gm, **options)[0].graph_module
    # the gather reads the norm's own weight multiply, its weight now times 1 / copies
    norm = q_proj(gm).args[0].args[0]
    assert norm.target is ir.aten.mul.Tensor
    assert not any("split_multiplier" in str(a.target) for a in norm.args if isinstance(a, torch.fx.Node))
    assert not any(n.op == "get_attr" and "layers_0_self_attn_q_proj_split_multiplier" in str(n.target)
                   for n in gm.graph.nodes)
    assert max_relative_error(first_output(gm, x), before) <= 1e-4


# --- the choice -------------------------------------------------------------------------------------

def outlier_samples(scale: float = 30.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 7] *= scale
    return x, [torch.randn(48, 64, generator=g), torch.randn(16, 64, generator=g)]


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_the_choice_lowers_the_error_within_the_budget(budget):
    x, weights = outlier_samples()
    split = split_channels.choose_split(x, weights, x.abs().amax(0), budget, 4, 4)
    assert 1 <= split.extra <= budget
    assert split.error < split.error_unsplit
    assert (split.index[64:] == 7).sum() >= split.extra / 2  # mostly the outlier's copies
    torch.testing.assert_close(split.apply(x) @ split.weight(weights[0]).t(), x @ weights[0].t(), rtol=1e-4, atol=1e-3)


def test_no_split_when_none_helps():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256, 64, generator=g) * 2 - 1  # flat channels: nothing stands out
    split = split_channels.choose_split(x, [torch.randn(32, 64, generator=g)], x.abs().amax(0), 8, 4, 4)
    assert split.extra == 0 and split.error == split.error_unsplit


@pytest.mark.parametrize("bad", ["zeros", "nan", "constant"])
def test_bad_samples_never_split_into_nan(bad):
    x, weights = outlier_samples()
    if bad == "zeros":
        x = torch.zeros_like(x)
    elif bad == "nan":
        x[3, 2] = float("nan")
    else:
        x[:, 7] = 100.0  # a constant channel: a split is fine, its values must stay finite
    absmax = x.abs().amax(0)
    split = split_channels.choose_split(x, weights, absmax, 8, 4, 4)
    assert torch.isfinite(split.multiplier).all() and (split.multiplier > 0).all()
    if bad != "constant":
        assert split.extra == 0


def test_candidate_targets_stay_within_the_budget():
    absmax = torch.tensor([100.0, 50.0, 10.0, 9.0, 1.0, 1.0])
    for budget in (1, 3, 10, 200):
        targets = split_channels.candidate_targets(absmax, budget)
        assert targets and all(split_channels.extra_channels(absmax, t) <= budget for t in targets)


@pytest.mark.slow
def test_split_graphs_lowered_through_inductor_compute_the_eager_bits():
    """w4a4-split on a tiny Llama with an outlier channel: Inductor (the gather fused before the
    quantize) gives the logits of the same graph run op by op."""
    import qcompile.backends.q4 as q4_backend
    from qcompile.core.recipes import RECIPES

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[OUTLIER] *= 40
    g = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)}]
    x = torch.randint(0, 256, (1, 24), generator=g)
    logits = {}
    for lower in ("eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="q4", options={"pipeline": RECIPES["w4a4-split"], "lower": lower,
                                                               "calibration": calibration, "progress": False})
        with torch.no_grad():
            logits[lower] = compiled(input_ids=x, use_cache=False).logits
        gm = q4_backend.compiled_graphs()[-1].graph_module
        assert any(n.target is ir.aten.index_select.default for n in gm.graph.nodes)
    assert torch.equal(logits["eager"], logits["inductor"])
