"""token_positions: the graph's own token positions, which tell a sequence's first token at run time."""

from __future__ import annotations

import pytest
import torch

from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.core.positions import token_positions
from tests.helpers.models import tiny_model

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def _graph(family: str):
    return capture(tiny_model(family), IDS, **({} if family == "bert" else {"use_cache": False}))


def _value(gm, node) -> torch.Tensor:
    """What `node` computes when the graph runs on IDS."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n] = super().run_node(n)
            return seen[n]

    with torch.no_grad():
        Recorder(gm).run(IDS)
    return seen[node]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_rotary_positions_are_what_the_cos_reads(family):
    gm = _graph(family)
    positions = token_positions(gm)
    value = ir.fake_value(positions)
    assert value.dtype == torch.int64 and tuple(value.shape) in ((1, 9), (1, 9, 1), (2, 9), (2, 9, 1))
    # the graph computes positions 0..8 for a call without a cache
    assert torch.equal(_value(gm, positions).flatten(), torch.arange(9))


def test_bert_positions_are_its_arange_buffer_slice():
    gm = _graph("bert")
    positions = token_positions(gm)
    assert positions.target is torch.ops.aten.slice.Tensor
    assert torch.equal(_value(gm, positions), torch.arange(9)[None])


def test_offset_absolute_positions_are_not_taken():
    """OPT computes its position index from the attention mask, offset by 2: no position 0 to find."""
    assert token_positions(_graph("opt")) is None
