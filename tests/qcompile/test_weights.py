"""Weight expressions (qcompile/core/weights.py): a pass's rewrite of a weight, computed when read."""

from __future__ import annotations

import torch
from torch import fx

from qcompile.core import ir, qlinear, weights
from qcompile.kernels import rotation

q4 = torch.ops.q4


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(24, 5, bias=False)

    def forward(self, x):
        return self.proj(x)


def linear_graph() -> tuple[fx.GraphModule, fx.Node, torch.Tensor]:
    """linear(x, W) with W a get_attr constant (as after freezing): (graph, the linear, W)."""
    torch.manual_seed(0)
    model = Linear()
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    w.meta[ir.FQN] = "proj.weight"
    lin = graph.call_function(ir.aten.linear.default, (x, w))
    graph.output(lin)
    gm = fx.GraphModule({"w": model.proj.weight.detach().clone()}, graph)
    return gm, lin, gm.w


def test_an_expression_is_its_weight_rewritten_and_the_graph_runs_it():
    gm, lin, w = linear_graph()
    s = torch.rand(24) + 0.5
    factors = rotation.rotation_factors(24)
    with gm.graph.inserting_before(lin):
        factor_nodes = [gm.graph.get_attr(ir.add_constant(gm, f"f{i}", f)) for i, f in enumerate(factors)]
    scaled = weights.derive(gm, ir.aten.mul.Tensor, lin.args[1], [s], "migrated", "test", lin)
    rotated = weights.derive(gm, q4.rotate_weight.default, scaled, [factor_nodes, True], "rotated", "test", lin)
    lin.update_arg(1, rotated)
    gm.recompile()

    expected = rotation.rotate(w * s, factors)
    assert scaled.name == "proj_weight_migrated" and rotated.name == "proj_weight_rotated"
    assert rotated.meta[ir.FQN] == "proj.weight" and weights.root(rotated) is scaled.args[0]
    assert weights.shape_and_dtype(gm, rotated) == (w.shape, w.dtype)
    assert qlinear.weight_shape(gm, lin) == w.shape
    assert torch.equal(weights.value(gm, rotated), expected)
    assert torch.equal(qlinear.constant_weight(gm, lin), expected)
    x = torch.randn(3, 24)
    torch.testing.assert_close(gm(x), x @ expected.T, rtol=1e-5, atol=1e-5)  # the graph runs the expression
    assert torch.equal(w, gm.w)  # the constant it starts from is not touched


def rotated_graph() -> tuple[fx.GraphModule, fx.Node, torch.Tensor]:
    """linear(x, rotate_weight(W * s)): (graph, the linear, the weight's value)."""
    gm, lin, _ = linear_graph()
    with gm.graph.inserting_before(lin):
        factor_nodes = [gm.graph.get_attr(ir.add_constant(gm, f"f{i}", f))
                        for i, f in enumerate(rotation.rotation_factors(24))]
    scaled = weights.derive(gm, ir.aten.mul.Tensor, lin.args[1], [torch.rand(24) + 0.5], "migrated", "test", lin)
    lin.update_arg(1, weights.derive(gm, q4.rotate_weight.default, scaled, [factor_nodes, True], "rotated", "test", lin))
    gm.recompile()
    return gm, lin, weights.value(gm, lin.args[1])


def test_fold_makes_a_read_expression_a_constant_of_its_value():
    gm, lin, value = rotated_graph()
    x = torch.randn(3, 24)
    before = gm(x)
    assert weights.fold(gm) == 1
    assert not any(weights.is_expression(n) for n in gm.graph.nodes)
    const = lin.args[1]
    assert const.op == "get_attr" and const.meta[ir.FQN] == "proj.weight"
    assert torch.equal(ir.get_constant(gm, const), value)
    assert torch.equal(gm(x), before)
    ir.delete_unused_constants(gm)
    assert not any(name.endswith("_scale") for name, _ in gm.named_buffers())  # the expression's own constants went
    assert weights.fold(gm) == 0


def test_drop_erases_an_unread_expression_and_what_only_it_read():
    gm, lin, _ = rotated_graph()
    old = lin.args[1]
    with gm.graph.inserting_before(lin):
        new = gm.graph.get_attr(ir.add_constant(gm, "quantized", torch.zeros(5, 24)))
    lin.update_arg(1, new)
    weights.drop(gm, old)
    # the expressions, the weight they started from, the scale and the factors: only they read them
    assert [n.name for n in gm.graph.nodes] == ["x", "quantized", "linear_default", "output"]
    assert not any(hasattr(gm, name) for name in ("w", "proj_weight_migrated_scale", "f0"))


def test_drop_keeps_what_another_node_still_reads():
    gm, lin, _ = rotated_graph()
    scaled = lin.args[1].args[0]
    with gm.graph.inserting_before(lin):
        other = gm.graph.call_function(ir.aten.sum.default, (scaled,))
    lin.update_arg(1, gm.graph.get_attr(ir.add_constant(gm, "quantized", torch.zeros(5, 24))))
    weights.drop(gm, gm.graph.find_nodes(op="call_function", target=q4.rotate_weight.default)[0])
    assert scaled in other.all_input_nodes and scaled.graph is gm.graph and hasattr(gm, "w")

