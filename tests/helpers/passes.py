"""Toy passes and graphs for the pass infrastructure tests, and running one pass as the pass
manager does.

The toy passes' names start with `test-`, so they cannot collide with qcompile's passes. They are
not registered when this module is imported: a test that names them in a pipeline uses the
`toy_passes` fixture (tests/conftest.py), which registers `TOY_PASSES` for that test only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.core.pass_api import PassResult, QPass, get_pass_class, option
from tests.helpers.models import tiny_model

SOURCE = 'File "model.py", line 12, in forward\n    return torch.relu(x) + 1\n'


class Tiny(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def tiny_graph() -> fx.GraphModule:
    """`relu(x) + 1`, traced; the relu node carries a user source line like Dynamo's."""
    gm = fx.symbolic_trace(Tiny())
    next(n for n in gm.graph.nodes if n.name == "relu").meta["stack_trace"] = SOURCE
    return gm


class Noop(QPass):
    name = "test-noop"
    summary = "Look at every node, change nothing."
    statistics = ("nodes-seen",)

    def call(self, gm):
        for _ in self.nodes(gm):
            self.count("nodes-seen")
        return PassResult(gm, False)


@dataclass(frozen=True)
class AddNodeOptions:
    count: int = 1
    mode: str = option("fast", choices=("fast", "exact"))
    flag: bool = False
    label: str = "x"


class AddNode(QPass):
    name = "test-add-node"
    summary = "Negate the output `count` times (each a new node with provenance)."
    Options = AddNodeOptions
    statistics = ("nodes-added",)

    def call(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        value = output.args[0]
        for _ in range(self.options.count):
            with gm.graph.inserting_before(output):
                value = ir.mark_created(gm.graph.call_function(torch.neg, (value,)), self.name, [value])
            self.count("nodes-added")
        output.args = (value,)
        gm.recompile()
        return PassResult(gm, self.options.count > 0)


@dataclass(frozen=True)
class BreakOptions:
    modified: bool = False


class BreakProvenance(QPass):
    name = "test-break-provenance"
    summary = "Stamp provenance naming an unregistered pass on the relu (breaks an invariant)."
    Options = BreakOptions

    def call(self, gm):
        relu = next(n for n in gm.graph.nodes if n.name == "relu")
        relu.meta[ir.PROVENANCE] = {"pass": "no-such-pass", "from": []}
        return PassResult(gm, self.options.modified)


@dataclass(frozen=True)
class FailOptions:
    at: str = "relu"


class Fail(QPass):
    name = "test-fail"
    summary = "Raise when reaching the node named `at`."
    Options = FailOptions

    def call(self, gm):
        for node in self.nodes(gm):
            if node.name == self.options.at:
                raise ValueError("boom")
        return PassResult(gm, False)


class ReturnsNone(QPass):
    name = "test-returns-none"
    summary = "Forget to return a PassResult."

    def call(self, gm):
        return None


TOY_PASSES = (Noop, AddNode, BreakProvenance, Fail, ReturnsNone)


def run_pass(name: str, gm, **options):
    """(PassResult, statistics) of one run of the registered pass `name`; options as keyword
    arguments (`alpha=0.8`), parsed as a pipeline's `{...}` would be."""
    cls = get_pass_class(name)
    qpass = cls(cls.parse_options({k.replace("_", "-"): str(v) for k, v in options.items()}))
    result = qpass(gm)
    return result, qpass.stats


def capture_family(family, x):
    """Decoders without the KV cache: a returned cache is an output the migration must not change."""
    kwargs = {} if family == "bert" else {"use_cache": False}
    return capture(tiny_model(family), x, **kwargs)


def first_output(gm, x):
    out = gm(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def forced_split(x, weights, absmax, budget, w_bits, a_bits, rotated=False):
    """A stand-in for `split_channels.choose_split` that always splits (the three widest channels
    into 2, 3 and 4 copies: 6 more), whatever the error says: tests of the rewrite itself."""
    from qcompile.algorithms import split_channels

    copies = torch.ones(x.shape[-1], dtype=torch.int64)
    copies[absmax.argsort(descending=True)[:3]] = torch.tensor([2, 3, 4])
    return split_channels.split_for(copies, 0.0, 1.0)
