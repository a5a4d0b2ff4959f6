"""fold-scales: before/after IR on small modules, exactness, and the invariant it establishes."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import ir, weights
from qcompile.core.pass_api import passes_run
from qcompile.core.verify import VerificationError, verify
from tests.helpers.models import inputs
from tests.helpers.passes import capture_family, first_output, run_pass


class LayerScaled(torch.nn.Module):
    """RMSNorm, then a per-channel layer scale and a scalar in front of q/k; a scale after `out`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.RMSNorm(16)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2.0)
        self.register_buffer("layer_scale", torch.rand(16) + 0.5)
        self.register_buffer("out_scale", torch.rand(6) + 0.5)
        self.q = torch.nn.Linear(16, 8)
        self.k = torch.nn.Linear(16, 8, bias=False)
        self.out = torch.nn.Linear(8, 6)
        self.free = torch.nn.Linear(16, 6)

    def forward(self, x):
        h = self.norm(x) * self.layer_scale * 0.5
        y = self.out(self.q(h) + self.k(h)) * self.out_scale
        return y + self.free(x / self.layer_scale)


def test_before_after_ir_and_exactness():
    x = torch.randn(2, 5, 16)
    gm = capture(LayerScaled().eval(), x)
    before = gm(x)[0].clone() if isinstance(gm(x), (tuple, list)) else gm(x).clone()
    muls_before = gm.code.count("aten.mul.Tensor") + gm.code.count("aten.div.Tensor")

    result, stats = run_pass("fold-scales", gm)

    assert result.modified
    # layer_scale and 0.5 fold into the norm's weight; out_scale into out's rows; x / layer_scale
    # into free's columns
    assert stats["scales-folded-into-norms"] == 2
    assert stats["scales-folded-into-rows"] == 1
    assert stats["scales-folded-into-columns"] == 1
    code = result.graph_module.code
    scales = [n for n in result.graph_module.graph.nodes if n.target in (ir.aten.mul.Tensor, ir.aten.div.Tensor)]
    assert len([n for n in scales if not weights.is_expression(n)]) == muls_before - 4
    # out's rows and free's columns: weight expressions (W * c, computed when read), no new weights
    assert sorted(n.name for n in scales if weights.is_expression(n)) == ["free_weight_folded", "out_weight_folded"]
    FileCheck().check("norm_weight_folded").check("aten.rms_norm").check_next("aten.linear").run(code)
    after = first_output(result.graph_module, x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert "fold-scales" in passes_run(result.graph_module)


@pytest.mark.parametrize("family,rows", [("llama", 0), ("opt", 2)])
def test_norm_weights_stay_and_opt_query_scaling_folds_into_q_proj(family, rows):
    x = inputs()
    gm = capture_family(family, x)
    before = first_output(gm, x).detach().clone()
    result, stats = run_pass("fold-scales", gm)
    # a norm's own weight is where migrated scales live: never folded away
    assert stats["scales-folded-into-norms"] == stats["scales-folded-into-scales"] == 0
    assert stats["scales-folded-into-columns"] == 0
    # OPT multiplies q_proj's output by head_dim ** -0.5 (one per layer): into q_proj's rows
    assert stats["scales-folded-into-rows"] == rows
    after = first_output(result.graph_module, x)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-5


def test_invariant_catches_a_scale_left_in_front_of_a_quantized_linear():
    x = torch.randn(2, 5, 16)
    unfolded = capture(LayerScaled().eval(), x)
    run_pass("insert-quantizers", unfolded)
    unfolded.meta[ir.PASSES_RUN] = ["fold-scales", *passes_run(unfolded)]  # claim fold-scales ran when it did not
    with pytest.raises(VerificationError, match="per-channel-scales-are-folded"):
        verify(unfolded)

    folded = capture(LayerScaled().eval(), x)
    run_pass("fold-scales", folded)
    run_pass("insert-quantizers", folded)
    run_pass("fuse-kernels", folded)
    verify(folded)
    assert sum(1 for n in folded.graph.nodes if n.target is torch.ops.q4.linear_w4a4.default) == 4


def test_calibration_stats_follow_a_fold_into_columns():
    x = torch.randn(2, 5, 16)
    gm = capture(LayerScaled().eval(), x)
    free = next(n for n in gm.graph.nodes if ir.module_path(n).endswith("free"))
    absmax_before = free.meta[ir.CALIB].absmax.clone()
    run_pass("fold-scales", gm)
    # free now reads x itself, not x / layer_scale
    torch.testing.assert_close(free.meta[ir.CALIB].absmax, x.abs().amax(dim=(0, 1)))
    assert not torch.allclose(absmax_before, free.meta[ir.CALIB].absmax)


class SharedScale(torch.nn.Module):
    """A scaled activation read by a linear and by a matmul, as in `(a(h) @ b(h).T) @ h` with
    `h = x / n` (found by tests/fuzz): the linear's input is scaled, but not only for it; and two
    scales in a row, which merge into one that must fold on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("scale", torch.rand(16) + 0.5)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = x * self.scale / 3
        return self.lin(h) @ h.transpose(-1, -2)


def test_a_scale_read_by_a_linear_and_another_op_folds_into_the_linear_and_stays_for_the_other():
    x = torch.randn(2, 5, 16)
    gm = capture(SharedScale().eval(), x)
    before = first_output(gm, x).detach().clone()
    result, stats = run_pass("fold-scales", gm)
    assert stats["scales-folded-into-scales"] == 1 and stats["scales-folded-into-columns"] == 1
    lin = next(n for n in result.graph_module.graph.nodes if n.target is ir.aten.linear.default)
    assert lin.args[0].op == "placeholder"  # the linear reads x; the matmul still reads x * scale / 3
    torch.testing.assert_close(first_output(result.graph_module, x), before, rtol=1e-5, atol=1e-5)
    run_pass("insert-quantizers", gm)
    run_pass("fuse-kernels", gm)
    verify(gm)  # before the fix: a scale fold-scales left in front of the linear's quantizer


class Chained(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(x * 2.0 / 3)


def test_two_scales_in_a_row_merge_and_fold_into_the_linear():
    x = torch.randn(2, 5, 16)
    chained = capture(Chained().eval(), x)
    before = first_output(chained, x).detach().clone()
    _, stats = run_pass("fold-scales", chained)
    assert stats["scales-folded-into-scales"] == 1 and stats["scales-folded-into-columns"] == 1
    # no multiply left on the activation: the merged scale is the weight's (an expression, W * c)
    scales = [n for n in chained.graph.nodes if n.target in (ir.aten.mul.Tensor, ir.aten.div.Tensor)]
    assert [n.name for n in scales] == ["lin_weight_folded"] and weights.is_expression(scales[0])
    torch.testing.assert_close(first_output(chained, x), before, rtol=1e-5, atol=1e-5)
