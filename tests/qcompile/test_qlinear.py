"""The recognizer: each form of a linear, as the passes leave it, matched to the same QLinear fields."""

from __future__ import annotations

import pytest
import torch

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import ir, qlinear
from qcompile.core.pass_manager import PassManager
from tests.helpers.models import TwoHeads

q4 = torch.ops.q4


def linears(pipeline: str) -> dict[str, qlinear.QLinear]:
    """{linear node's module: QLinear} of TwoHeads after `pipeline`."""
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    gm = PassManager(pipeline).run(gm).graph_module
    return {ir.linear_module_path(n): q for n in gm.graph.nodes if (q := qlinear.match(n)) is not None}


@pytest.mark.parametrize("pipeline,form,a_bits", [
    ("", qlinear.FLOAT, None),
    ("insert-quantizers{skip=}", qlinear.FAKE_QUANT, 4),
    ("insert-quantizers{skip=,a-bits=8}", qlinear.FAKE_QUANT, 8),
    ("insert-quantizers{skip=,a-bits=16}", qlinear.WEIGHT_ONLY, None),
    ("insert-quantizers{skip=},fuse-kernels", qlinear.FUSED, 4),
])
def test_every_form_names_the_float_activation_its_bits_and_its_bias(pipeline, form, a_bits):
    found = linears(pipeline)
    assert len(found) == 3 and {q.form for q in found.values()} == {form}
    q, k = found["q"], found["k"]
    # q and k read the same normalized activation, whatever sits between it and the linear
    assert q.x is k.x and q.x.target is torch.ops.aten.layer_norm.default
    assert q.a_bits == k.a_bits == a_bits
    assert q.quantized == (form != qlinear.FLOAT) and q.fused == (form == qlinear.FUSED)
    # the bias read one way: q has one, k none
    assert q.bias is not None and q.bias.op == "get_attr" and k.bias is None
    if form == qlinear.FLOAT:
        assert q.weight.op == "get_attr" and q.packed is None
    else:
        assert q.weight is None and q.packed.op == "get_attr" and q.w_step.op == "get_attr"
    if form in (qlinear.FAKE_QUANT, qlinear.FUSED):
        assert q.quant is k.quant and q.quant.target is q4.quantize_per_tensor.default and q.a_step is not None


def test_the_triton_twin_is_the_same_fused_form():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    gm = PassManager("insert-quantizers{skip=},fuse-kernels").run(gm).graph_module
    node = next(n for n in gm.graph.nodes if n.target is q4.linear_w4a4.default)
    before = qlinear.match(node)
    node.target = q4.linear_w4a4_triton.default
    after = qlinear.match(node)
    assert after.form == qlinear.FUSED and (after.x, after.a_bits, after.bias) == (before.x, before.a_bits, before.bias)


def test_constant_weight_is_the_float_linears_weight_only():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    float_linears = [n for n in gm.graph.nodes if qlinear.match(n) is not None]
    assert all(qlinear.constant_weight(gm, n).shape[1] in (16, 8) for n in float_linears)
    assert qlinear.constant_weight(gm, next(n for n in gm.graph.nodes if n.op == "placeholder")) is None
    gm = PassManager("insert-quantizers{skip=}").run(gm).graph_module
    assert all(qlinear.constant_weight(gm, n) is None for n in gm.graph.nodes)


def test_other_nodes_are_not_linears():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    others = [n for n in gm.graph.nodes if n.target is not torch.ops.aten.linear.default]
    assert others and not any(qlinear.is_linear(n) for n in others)
