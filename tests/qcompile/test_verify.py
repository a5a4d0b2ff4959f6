"""The verifier: lint plus qcompile's invariants, each named in the error with its node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.core import ir
from qcompile.core import verify as verify_module
from qcompile.core.pass_api import passes_run
from qcompile.core.verify import VerificationError, verify
from qcompile.passes.fold_scales import FoldScales
from tests.helpers import passes as toys
from tests.helpers.passes import tiny_graph

pytestmark = pytest.mark.usefixtures("toy_passes")  # the toy passes are registered for each test


LINEAR_W4A4 = torch.ops.q4.linear_w4a4.default


def fused_graph(weight_dtype=torch.uint8, step_from_input=False, w_mult_dtype=None) -> fx.GraphModule:
    """x -> q4.linear_w4a4(x, w_packed, w_step, a_step, None, float32), as fuse-kernels leaves it;
    with w_mult_dtype, group multipliers of that dtype (w_mult=...)."""
    root = torch.nn.Module()
    root.register_buffer("w_packed", torch.zeros(4, 16, dtype=weight_dtype))
    root.register_buffer("w_step", torch.ones(4))
    root.register_buffer("a_step", torch.tensor(0.1))
    graph = fx.Graph()
    x = graph.placeholder("x")
    a_step = graph.placeholder("a_step_in") if step_from_input else graph.get_attr("a_step")
    args = (x, graph.get_attr("w_packed"), graph.get_attr("w_step"), a_step, None, torch.float32)
    kwargs = {}
    if w_mult_dtype is not None:
        root.register_buffer("w_mult", torch.ones(4, 1, dtype=w_mult_dtype))
        kwargs["w_mult"] = graph.get_attr("w_mult")
    linear = graph.call_function(LINEAR_W4A4, args, kwargs)
    linear.meta[ir.PROVENANCE] = {"pass": "test-add-node", "from": ["linear"]}
    graph.output(linear)
    return fx.GraphModule(root, graph)


def violation(gm) -> VerificationError:
    with pytest.raises(VerificationError) as e:
        verify(gm)
    return e.value


def test_a_clean_graph_verifies():
    verify(tiny_graph())
    verify(fused_graph())


def test_provenance_must_name_a_registered_pass():
    gm = tiny_graph()
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    relu.meta[ir.PROVENANCE] = {"pass": "no-such-pass", "from": []}
    error = violation(gm)
    assert error.invariant == "provenance-names-a-registered-pass" and error.node is relu
    assert "'no-such-pass'" in str(error) and "model.py:12" in str(error)


def test_q4_ops_need_provenance():
    gm = fused_graph()
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    del linear.meta[ir.PROVENANCE]
    error = violation(gm)
    assert error.invariant == "q4-op-has-provenance" and "q4.linear_w4a4.default" in str(error)


def test_get_attr_target_must_exist():
    gm = tiny_graph()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        gm.graph.create_node("get_attr", "missing")
    error = violation(gm)
    assert error.invariant == "get-attr-target-exists" and "'missing'" in str(error)


def test_linear_w4a4_weight_must_be_a_uint8_constant():
    error = violation(fused_graph(weight_dtype=torch.float32))
    assert error.invariant == "linear-w4a4-reads-constants"
    assert "packed weight 'w_packed' has dtype torch.float32, expected torch.uint8" in str(error)


def test_linear_w4a4_steps_must_be_constants():
    error = violation(fused_graph(step_from_input=True))
    assert "activation step (argument 3) is not a get_attr constant" in str(error)


def test_linear_w4a4_group_multipliers_must_be_a_uint8_constant():
    verify(fused_graph(w_mult_dtype=torch.uint8))
    error = violation(fused_graph(w_mult_dtype=torch.int32))
    assert "group multiplier tensor 'w_mult' has dtype torch.int32, expected torch.uint8" in str(error)


def test_lint_errors_are_verification_errors():
    gm = tiny_graph()
    x, relu = list(gm.graph.nodes)[:2]
    add = relu.next
    x.append(add)  # now the add reads relu before relu is defined
    error = violation(gm)
    assert error.invariant == "graph-lint" and isinstance(error.__cause__, Exception)


def test_invariants_are_an_open_list(monkeypatch):
    def no_relu(gm, node):
        return "relu is banned" if node.target is torch.relu else None

    monkeypatch.setattr(verify_module, "INVARIANTS", [*verify_module.INVARIANTS, no_relu])
    error = violation(tiny_graph())
    assert error.invariant == "no-relu" and str(error).startswith("invariant 'no-relu' violated at %relu")


def no_relu_anywhere(gm, node):
    return "relu is banned" if node.target is torch.relu else None


def test_a_pass_declares_its_invariants_and_they_hold_once_it_ran(monkeypatch):
    monkeypatch.setattr(toys.Noop, "invariants", (no_relu_anywhere,))
    gm = tiny_graph()
    verify(gm)  # test-noop has not run on this graph: its invariant does not apply yet
    toys.Noop()(gm)
    assert passes_run(gm) == ["test-noop"]
    error = violation(gm)
    assert error.invariant == "no-relu-anywhere" and error.node.name == "relu"
    assert "relu is banned" in str(error)


def test_fold_scales_declares_its_invariant_and_the_verifier_imports_no_pass():
    assert [check.__name__ for check in FoldScales.invariants] == ["per_channel_scales_are_folded"]
    source = Path(verify_module.__file__).read_text()
    assert "qcompile.passes" not in source and "fold_scales" not in source
