"""skip= / only=: one reading for every pass, including a language-model head tied to the embedding."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import ir, qlinear
from qcompile.core.select import LinearFilter
from tests.helpers.models import TwoHeads, tiny_llama
from tests.helpers.passes import run_pass


@pytest.fixture(scope="module")
def tied():
    """tiny_llama whose lm_head weight IS the embedding's, captured once (each test copies it)."""
    torch._dynamo.reset()
    model = tiny_llama(layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return capture(model, torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def untied_without_module_paths():
    """tiny_llama with its own head weight, in a graph that records no module paths (the head is
    known only by its weight's name, `lm_head.weight`)."""
    torch._dynamo.reset()
    gm = capture(tiny_llama(layers=1), torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0)))
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    return gm


def head(gm):
    return next(n for n in gm.graph.nodes if qlinear.is_linear(n) and LinearFilter.path(n) == "lm_head")


def test_a_tied_head_is_named_lm_head_not_after_its_weight(tied):
    node = head(tied)
    assert node.args[1].meta[ir.FQN] == "model.embed_tokens.weight"  # the weight is named for the embedding
    assert LinearFilter.path(node) == "lm_head"
    assert LinearFilter(skip="lm_head").skips(node) and not LinearFilter(only="embed").selects(node)


@pytest.mark.parametrize("graph", ["tied", "untied_without_module_paths"])
@pytest.mark.parametrize("name,options", [
    ("migrate-scales", {"method": "smoothquant"}),
    ("rotate-inputs", {}),
    ("insert-quantizers", {}),
])
def test_skip_lm_head_skips_the_head_in_every_pass(request, graph, name, options):
    gm = copy.deepcopy(request.getfixturevalue(graph))
    before = head(gm)
    weight, x = before.args[1], before.args[0]
    result, _ = run_pass(name, gm, skip="lm_head", **options)
    assert result.modified  # the pass did take the other linears
    after = head(result.graph_module)
    q = qlinear.match(after)
    # the head is the float linear it was: same weight constant, same input
    assert q.form == qlinear.FLOAT and q.weight is weight and q.x is x, name
    assert ir.PROVENANCE not in after.args[1].meta


def test_skip_and_only_in_a_graph_without_module_paths():
    """Without `nn_module_stack` the weight's name stands in; an empty regex takes everything."""
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    lin = next(n for n in gm.graph.nodes if qlinear.is_linear(n) and n.args[1].meta.get(ir.FQN) == "out.weight")
    assert LinearFilter.path(lin) == "out"
    assert LinearFilter().takes(lin) and not LinearFilter(skip="^out$").takes(lin)
    assert LinearFilter(only="out").takes(lin) and not LinearFilter(only="^q$").takes(lin)
