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
shape is [B or 1, T] or [B or 1, T, 1].

An encoder with absolute position embeddings (BERT, MiniLM) looks its positions up in a table
with a slice of a constant `arange` buffer, which index and position alike:

    %slice_1 = aten.slice(const embeddings.position_ids i64[1, 512], 1, 0, T)   <- found
    %embedding_2 = aten.embedding(const embeddings.position_embeddings.weight, %slice_1)

Other absolute schemes are not taken: OPT's and RoBERTa's indices are offset from the position
and computed from the attention mask. A graph without positions (or with multimodal 3-D ones)
gives None, and a quantizer there keeps one step for every token.
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
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ir.aten.embedding.default and _is_position_table(node.args[0]):
            return node.args[1] if _is_arange_slice(gm, node.args[1]) else None
    return None


def _is_position_table(node: object) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    return "position_embeddings" in (node.meta.get(ir.FQN) or str(node.target))


def _is_arange_slice(gm: fx.GraphModule, node: object) -> bool:
    """`aten.slice(buffer, 1, 0, end)` of a constant [1, L] buffer holding 0, 1, ..., L - 1."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is ir.aten.slice.Tensor):
        return False
    dim, start, *rest = list(node.args[1:]) + [0, 0][len(node.args) - 1:]
    buffer = ir.get_constant(gm, node.args[0]) if isinstance(node.args[0], fx.Node) else None
    step = rest[1] if len(rest) > 1 else 1
    return (buffer is not None and buffer.dim() == 2 and buffer.shape[0] == 1 and buffer.dtype in _INTEGER
            and dim == 1 and start == 0 and step == 1
            and torch.equal(buffer[0], torch.arange(buffer.shape[1], dtype=buffer.dtype, device=buffer.device)))


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
