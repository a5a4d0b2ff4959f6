"""analyze-outliers: meta only, finds the planted outlier channel, and reports it."""

from __future__ import annotations

import torch

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.passes.analyze_outliers import outlier_report
from tests.helpers.models import Planted, Zero
from tests.helpers.passes import run_pass


def test_finds_the_planted_channel_and_changes_no_node():
    gm = capture(Planted().eval(), torch.randn(64, 16))
    code_before = gm.code
    result, stats = run_pass("analyze-outliers", gm, threshold=50)
    assert not result.modified and result.graph_module.code == code_before
    assert stats["linears-analyzed"] == 2 and stats["linears-with-outliers"] == 1
    infos = {n.meta[ir.OUTLIERS].module: n.meta[ir.OUTLIERS] for n in gm.graph.nodes if ir.OUTLIERS in n.meta}
    assert infos["a"].top[0][0] == 3 and infos["a"].max_ratio > 100
    assert infos["b"].max_ratio < 50
    report = outlier_report(gm)
    assert report.splitlines()[2].split()[0] == "a"  # worst first
    assert "3:" in report


def test_all_zero_activation_does_not_divide_by_zero():
    gm = capture(Zero().eval(), torch.randn(5, 4))
    run_pass("analyze-outliers", gm)
    (info,) = [n.meta[ir.OUTLIERS] for n in gm.graph.nodes if ir.OUTLIERS in n.meta]
    assert info.max_ratio == 0.0 and info.median_absmax == 0.0


def test_outliers_survive_into_the_fused_graph():
    gm = capture(Planted().eval(), torch.randn(64, 16))
    for name in ("analyze-outliers", "insert-quantizers", "fuse-kernels"):
        gm = run_pass(name, gm)[0].graph_module
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.q4.linear_w4a4.default]
    assert len(fused) == 2 and all(ir.OUTLIERS in n.meta for n in fused)
