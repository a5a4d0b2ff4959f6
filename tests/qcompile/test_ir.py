"""IR helpers: every node a pass creates carries `meta["val"]` from its op's fake implementation."""

from __future__ import annotations

import torch
from torch import fx

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.core.pass_manager import PassManager
from tests.helpers.models import TwoHeads

PIPELINE = ("analyze-outliers,migrate-scales{method=smoothquant},fold-scales,rotate-inputs{skip=},"
            "insert-quantizers{skip=},fuse-kernels")


class Recorder(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values = getattr(self, "values", {})
        self.values[n] = out
        return out


def test_every_node_a_pass_creates_has_the_value_it_computes():
    x = torch.randn(2, 3, 16)
    gm = PassManager(PIPELINE).run(capture(TwoHeads().eval(), x)).graph_module
    created = [n for n in gm.graph.nodes if ir.PROVENANCE in n.meta]
    made_by = {n.meta[ir.PROVENANCE]["pass"] for n in created}
    assert made_by == {"migrate-scales", "rotate-inputs", "insert-quantizers", "fuse-kernels"}, made_by
    recorder = Recorder(gm)
    with torch.no_grad():
        recorder.run(x)
    for node in created:
        val, real = node.meta.get("val"), recorder.values[node]
        assert isinstance(val, torch._subclasses.FakeTensor), ir.describe(node)
        assert (val.dtype, tuple(val.shape)) == (real.dtype, tuple(real.shape)), ir.describe(node)


def test_a_graph_without_fake_values_gets_none():
    gm = fx.symbolic_trace(torch.nn.ReLU())
    relu = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert ir.set_fake_value(relu) is None and "val" not in relu.meta
