"""analyze-outliers: find the activation channels that make static low-bit quantization hard.

From the calibration statistics of each linear's input (per-channel absmax and 99th
percentile), record how far each channel's range stands above the typical channel:
ratio[c] = absmax[c] / median_c(absmax). A static per-tensor step must cover the largest
channel, so a ratio of 100 leaves the median channel about 100x fewer quantization levels;
these are the channels channel-scale migration must move into the weights.

The graph is not changed; each analyzed linear gets `q4_outliers` meta (an `OutlierInfo`),
which later passes and the report read.

Before:
    linear = aten.linear(x, w)            # meta: q4_calib = ChannelStats(absmax=[...], robust=[...])
After (same graph):
    linear = aten.linear(x, w)            # meta: q4_outliers = OutlierInfo(max_ratio=850.2, top=[(412, 93.1, 850.2), ...])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import fx

from qcompile.core import ir, qlinear
from qcompile.core.pass_api import PassResult, QPass, option, register_pass


@dataclass(frozen=True)
class AnalyzeOutliersOptions:
    top: int = option(5, help="how many of the worst channels to record per linear")
    threshold: float = option(20.0, help="a linear has outliers when a channel's absmax exceeds this x the median")


@dataclasses.dataclass(frozen=True)
class OutlierInfo:
    """Outlier summary of one linear's input activation."""

    module: str
    channels: int
    median_absmax: float
    max_ratio: float  # max_c absmax[c] / median absmax
    robust_max_ratio: float  # the same with the 99th percentile: a spike in a few tokens does not count
    top: tuple[tuple[int, float, float], ...]  # (channel, absmax, ratio) of the worst channels


def analyze(stats, module: str, top: int) -> OutlierInfo:
    """The OutlierInfo of one activation from its ChannelStats; all-zero channels do not divide."""
    absmax, robust = stats.absmax.float(), stats.robust.float()
    median = absmax.median().item()
    robust_median = robust.median().item()
    ratio = absmax / median if median > 0 else torch.zeros_like(absmax)
    robust_ratio = robust.max().item() / robust_median if robust_median > 0 else 0.0
    worst = torch.topk(absmax, min(top, absmax.numel())).indices.tolist()
    return OutlierInfo(
        module=module,
        channels=absmax.numel(),
        median_absmax=median,
        max_ratio=ratio.max().item() if absmax.numel() else 0.0,
        robust_max_ratio=robust_ratio,
        top=tuple((c, absmax[c].item(), ratio[c].item()) for c in worst),
    )


@register_pass
class AnalyzeOutliers(QPass):
    name = "analyze-outliers"
    summary = "Record per-channel outlier ratios of every linear's input from calibration (meta only)."
    Options = AnalyzeOutliersOptions
    statistics = ("linears-analyzed", "linears-with-outliers", "linears-without-calibration")

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in self.nodes(gm):
            q = qlinear.match(node)
            if q is None or q.fused:  # aten.linear in any form
                continue
            stats = node.meta.get(ir.CALIB)
            if stats is None:
                self.count("linears-without-calibration")
                continue
            info = analyze(stats, ir.module_path(node) or node.name, self.options.top)
            node.meta[ir.OUTLIERS] = info
            self.count("linears-analyzed")
            if info.max_ratio > self.options.threshold:
                self.count("linears-with-outliers")
        return PassResult(gm, False)


def outlier_report(gm: fx.GraphModule, worst: int | None = None) -> str:
    """A table of the linears' input outliers, worst first (reads the `q4_outliers` meta)."""
    infos = {n.meta[ir.OUTLIERS].module: n.meta[ir.OUTLIERS] for n in gm.graph.nodes if ir.OUTLIERS in n.meta}
    rows = sorted(infos.values(), key=lambda i: -i.max_ratio)[:worst]
    return tabulate(
        [[i.module, i.channels, i.median_absmax, i.max_ratio, i.robust_max_ratio,
          ", ".join(f"{c}:{r:.0f}x" for c, _, r in i.top)] for i in rows],
        headers=["linear", "in channels", "median absmax", "max / median", "p99 max / median",
                 "worst channels (channel:ratio)"],
        floatfmt=("", "", ".3g", ".1f", ".1f", ""),
    )
