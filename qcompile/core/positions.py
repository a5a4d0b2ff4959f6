"""Where a graph holds its tokens' positions: what tells a sequence's first token (its attention
sink) from the others at run time.

    positions = token_positions(gm)   # the integer tensor the rotary embedding reads, or None

A decoder with rotary embeddings (Llama, Mistral, Qwen, Gemma, Phi-3, ...) computes each token's
cos/sin from an integer tensor of positions: `cache_position` or the `position_ids` the caller
passed (generate() makes them from the attention mask, so a left-padded row's first real token
is at position 0), `arange(past, past + T)` when neither came. In the captured ATen graph:

    %arange = aten.arange(T)                       # or a placeholder (position_ids, cache_position)
    %add = aten.add(%arange, past)
    %unsqueeze = aten.unsqueeze(%add, 0)           # i64[1, T]
    %unsqueeze_1 = aten.unsqueeze(%unsqueeze, 2)   # i64[1, T, 1]   <- found: the integer tensor
    %to = aten.to(%unsqueeze_1, f32)               #                   nearest to the cos
    %mul = aten.mul(%to, %inv_freq) ... %cat ... %cos = aten.cos(%cat)

`token_positions` walks back from the first `aten.cos` to the nearest integer tensor whose
shape is [B or 1, T] or [B or 1, T, 1]. A graph without one (absolute position embeddings, whose
index may be offset, as OPT's and RoBERTa's are; multimodal 3-D positions) gives None, and a
quantizer there keeps one step for every token.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import fx

from qcompile.core import ir

__all__ = ["token_positions"]

_INTEGER = (torch.int64, torch.int32)
_TRIG = (ir.aten.cos.default, ir.aten.sin.default)


def token_positions(gm: fx.GraphModule) -> fx.Node | None:
    """The integer positions tensor [B|1, T] or [B|1, T, 1] the rotary embedding reads, or None."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _TRIG:
            return _nearest_integer_source(node)
    return None


def _nearest_integer_source(start: fx.Node) -> fx.Node | None:
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        value = ir.fake_value(node)
        if node is not start and isinstance(value, torch.Tensor) and value.dtype in _INTEGER:
            shaped = value.dim() == 2 or (value.dim() == 3 and value.shape[-1] == 1)
            return node if shaped else None
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return None
