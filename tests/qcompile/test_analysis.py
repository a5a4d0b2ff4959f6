"""Analyses: computed once per graph, dropped when a pass changes the graph."""

from __future__ import annotations

import torch

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core.analysis import ActivationGroups, get_analysis, invalidate
from tests.helpers.models import TwoHeads
from tests.helpers.passes import run_pass


def two_heads():
    return capture(TwoHeads().eval(), torch.randn(2, 3, 16))


def test_activation_groups_are_the_linears_reading_one_activation():
    gm = two_heads()
    groups = get_analysis(gm, ActivationGroups).groups
    # q and k read the norm's output; out reads their sum
    assert [[lin.args[1].meta["q4_fqn"] for lin in linears] for linears in groups.values()] == [
        ["q.weight", "k.weight"], ["out.weight"]]
    assert [a.target for a in groups] == [torch.ops.aten.layer_norm.default, torch.ops.aten.add.Tensor]
    only_k = get_analysis(gm, ActivationGroups).select(lambda lin: lin.args[1].meta["q4_fqn"] == "k.weight")
    assert [len(linears) for linears in only_k.values()] == [1]


def test_computed_once_and_dropped_by_a_pass_that_changes_the_graph():
    gm = two_heads()
    first = get_analysis(gm, ActivationGroups)
    assert get_analysis(gm, ActivationGroups) is first
    run_pass("analyze-outliers", gm)  # meta only: modified=False keeps the analysis
    assert get_analysis(gm, ActivationGroups) is first
    result, _ = run_pass("insert-quantizers", gm, skip="")  # run directly, without a pass manager
    assert result.modified
    again = get_analysis(result.graph_module, ActivationGroups)
    assert again is not first and again.groups == {}  # no float linear is left


def test_a_graph_edited_outside_a_pass_is_not_served_stale():
    gm = two_heads()
    first = get_analysis(gm, ActivationGroups)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(torch.ops.aten.neg.default, (out.args[0][0],))
    assert get_analysis(gm, ActivationGroups) is not first
    invalidate(gm)
    assert get_analysis(gm, ActivationGroups).groups.keys() == first.groups.keys()
