"""qcompile.core.patterns: pattern rewrites over the IR a pass sees (`qcompile.api.testing.capture`)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import FileCheck

from qcompile.core import ir
from qcompile.core.pass_api import register_pass
from qcompile.core.pass_manager import PassFailure, PassManager
from qcompile.core.patterns import PatternMatch, PatternPass, rewrite

aten = torch.ops.aten
PASS = "test-pattern-pass"  # a registered name (below): provenance must name one


class Block(torch.nn.Module):
    """norm -> dropout(0.1) -> linear -> relu -> dropout(0.3): two eval dropouts, one relu."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.drop = torch.nn.Dropout(0.1)
        self.lin = torch.nn.Linear(16, 8)
        self.out_drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.out_drop(torch.relu(self.lin(self.drop(self.norm(x)))))


X = torch.randn(2, 3, 16)


@pytest.fixture
def gm():
    from qcompile.api.testing import capture

    torch.manual_seed(0)
    return capture(Block().eval(), X)


def dropout(x, p):
    return aten.dropout.default(x, p, False)


def identity(x, p):
    return x


def test_every_match_is_replaced_and_the_count_returned(gm):
    expected = copy.deepcopy(gm)(X)[0]
    FileCheck().check_count("aten.dropout.default", 2, exactly=True).run(gm.code)

    assert rewrite(gm, dropout, identity, pass_name=PASS) == 2

    FileCheck().check("aten.layer_norm").check("aten.linear").check("aten.relu").check_not("dropout").run(gm.code)
    gm.graph.lint()
    torch.testing.assert_close(gm(X)[0], expected, rtol=0, atol=0)


def test_check_sees_each_match_and_filters(gm):
    seen: list[PatternMatch] = []

    def check(match: PatternMatch) -> bool:
        seen.append(match)
        return match.inputs["p"] < 0.2

    assert rewrite(gm, dropout, identity, check, pass_name=PASS) == 1

    assert [m.inputs["p"] for m in seen] == [0.1, 0.3]  # parameters bind literals too
    first, second = seen
    assert first.inputs["x"].target is aten.layer_norm.default and first.anchor.target is aten.dropout.default
    assert list(first.nodes) == ["dropout_default"] and first.nodes["dropout_default"] is first.anchor
    assert ir.module_path(first.anchor) == "drop" and ir.module_path(second.anchor) == "out_drop"
    assert first.constant("p") == 0.1
    FileCheck().check_not("aten.dropout.default(layer_norm").check("aten.dropout.default(relu, 0.3, False)").run(gm.code)


def test_a_literal_in_the_pattern_must_be_equal_unless_literals_are_ignored(gm):
    def dropout_01(x):
        return aten.dropout.default(x, 0.1, False)

    def keep(x):
        return x

    assert rewrite(gm, dropout_01, keep, pass_name=PASS) == 1
    FileCheck().check_count("aten.dropout.default(relu, 0.3, False)", 1, exactly=True).run(gm.code)
    assert rewrite(gm, dropout_01, keep, pass_name=PASS, ignore_literals=True) == 1
    FileCheck().check_not("dropout").run(gm.code)


def relu_of_linear(x, w, b):
    return aten.relu.default(aten.linear.default(x, w, b))


def clamp_of_linear(x, w, b):
    return aten.clamp_min.default(aten.linear.default(x, w, b), 0.0)


def test_new_nodes_carry_provenance_and_the_meta_of_what_they_replace(gm):
    old_linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    old_relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    relu_line, relu_val = ir.source_line(old_relu), old_relu.meta["val"]
    expected = copy.deepcopy(gm)(X)[0]

    assert rewrite(gm, relu_of_linear, clamp_of_linear, pass_name=PASS) == 1

    FileCheck().check("aten.linear").check("aten.clamp_min.default").check_not("aten.relu").run(gm.code)
    clamp = next(n for n in gm.graph.nodes if n.target is aten.clamp_min.default)
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    # the new result: made by the pass from the replaced nodes, with the relu's source line
    assert clamp.meta[ir.PROVENANCE] == {"pass": PASS, "from": ["relu", "linear"]}
    assert ir.source_line(clamp) == relu_line != "" and clamp.meta["val"] is relu_val
    # a new node calling what a replaced node called takes over its meta (module path, calibration)
    assert linear.meta[ir.PROVENANCE] == {"pass": PASS, "from": ["linear", "relu"]}
    assert ir.module_path(linear) == "lin" and linear.meta[ir.CALIB] is old_linear.meta[ir.CALIB]
    torch.testing.assert_close(gm(X)[0], expected, rtol=0, atol=0)


def test_no_match_returns_zero_and_leaves_the_graph_untouched(gm):
    nodes, code = [(n.name, n.target, n.args) for n in gm.graph.nodes], gm.code

    def gelu(x):
        return aten.gelu.default(x)

    assert rewrite(gm, gelu, gelu, pass_name=PASS) == 0
    assert rewrite(gm, dropout, identity, lambda match: False, pass_name=PASS) == 0
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == nodes and gm.code == code


def test_inputs_only_the_replaced_nodes_read_are_deleted(gm):
    def add_nothing(x, y):
        return aten.add.Tensor(x, aten.sub.Tensor(y, y))

    def just_x(x, y):
        return x

    from qcompile.api.testing import capture

    traced = capture(DeadInput(), X)
    FileCheck().check("aten.relu").check("aten.sub").check("aten.add").run(traced.code)
    assert rewrite(traced, add_nothing, just_x, pass_name=PASS) == 1
    FileCheck().check_not("aten.relu").check_not("aten.sub").check_not("aten.add").run(traced.code)
    torch.testing.assert_close(traced(X)[0], X)


class DeadInput(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        return x + (y - y)


def test_a_replacement_creating_tensor_constants_is_refused(gm):
    scale = torch.ones(16)

    def scaled(x, p):
        return aten.mul.Tensor(x, scale)

    with pytest.raises(TypeError, match="tensor constants"):
        rewrite(gm, dropout, scaled, pass_name=PASS)


@register_pass
class DropSmallDropouts(PatternPass):
    name = PASS
    summary = "Delete eval dropouts with p below 0.2 (a PatternPass for the tests)."
    statistics = ("dropouts-removed",)

    def pattern(self, x, p):
        return aten.dropout.default(x, p, False)

    def replacement(self, x, p):
        return x

    def check(self, match: PatternMatch) -> bool:
        if match.inputs["p"] > 0.5:
            raise ValueError("p too large")
        return match.inputs["p"] < 0.2


def test_pattern_pass_gets_call_and_counts_its_first_statistic(gm):
    result = DropSmallDropouts()(gm)
    assert result.modified and DropSmallDropouts.statistics == ("dropouts-removed",)
    again = DropSmallDropouts()
    assert not again(result.graph_module).modified and again.stats["dropouts-removed"] == 0


def test_pattern_pass_statistic_and_failure_in_check_name_the_match(gm):
    record = PassManager(PASS).run(copy.deepcopy(gm)).records[0]
    assert record.modified and record.stats == {"dropouts-removed": 1}

    big = next(n for n in gm.graph.nodes if n.target is aten.dropout.default and n.args[1] == 0.3)
    big.args = (big.args[0], 0.9, False)
    gm.recompile()
    with pytest.raises(PassFailure) as e:
        PassManager(PASS).run(gm)
    assert f"pass {PASS} failed" in str(e.value) and "at node: %dropout_1" in str(e.value)
    assert "p too large" in str(e.value)


@dataclasses.dataclass(frozen=True)
class ExactOptions:
    p: float = 0.3


class DropExactly(PatternPass):
    """Unregistered: a pattern method that reads an option (the literal is baked into the pattern)."""

    name = PASS
    summary = "Delete eval dropouts of probability `p` exactly."
    Options = ExactOptions
    statistics = ("dropouts-removed",)

    def pattern(self, x):
        return aten.dropout.default(x, self.options.p, False)

    def replacement(self, x):
        return x


def test_pattern_methods_read_the_options(gm):
    qpass = DropExactly(ExactOptions(p=0.3))
    assert qpass(gm).modified and qpass.stats["dropouts-removed"] == 1
    FileCheck().check("aten.dropout.default(layer_norm, 0.1, False)").check_not("0.3").run(gm.code)
