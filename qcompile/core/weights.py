"""Weight expressions: the passes' rewrites of a linear's weight, kept as ops until it is rounded.

migrate-scales, fold-scales and rotate-inputs rewrite the weight of every linear they touch
(W[:, j] * s[j], W[i, :] * r[i], W @ R). Folded at once into new float constants, those rewrites
kept a second float copy of the model's weights alive from the first of the passes until
insert-quantizers rounded each one: 515 MiB on SmolLM2-135M, the largest thing held while
quantizing it. Instead a pass writes its rewrite as an op on the weight it found, in the graph:

    w_q = get_attr[model.layers.0.self_attn.q_proj.weight]      # the user's parameter
    w_q_migrated = aten.mul(w_q, w_q_migrated_scale)             # W[:, j] * s[j]
    w_q_rotated = q4.rotate_weight(w_q_migrated, [rotation_576_0, ...])   # W @ R
    q = aten.linear(h_rot, w_q_rotated)

The graph is still the program it was (it runs the expression when it is run), every rewrite
is in the printed IR, and a pass that reads the weight (`value`) computes it then, one linear's
worth of memory at a time. insert-quantizers rounds that value and `drop`s the expression;
`fold` turns what is left (linears left in float) into constants when the pipeline ends, so
lowering and saved artifacts see plain constants as before.

An expression node is a `call_function` flagged `meta[WEIGHT_EXPRESSION]`; its first argument is
the weight it rewrites (a constant or another expression), the others constants, and it keeps
that weight's shape and dtype, so `shape_and_dtype` reads them off the root constant for free.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from qcompile.core import ir

# node meta: this call_function computes a weight from constants (see the module doc)
WEIGHT_EXPRESSION = "q4_weight_expression"


def is_expression(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and bool(node.meta.get(WEIGHT_EXPRESSION))


def root(node: fx.Node) -> fx.Node:
    """The constant a weight expression starts from (a constant is its own root)."""
    while is_expression(node):
        node = node.args[0]
    return node


def shape_and_dtype(gm: fx.GraphModule, node: Any) -> tuple[torch.Size, torch.dtype] | None:
    """The shape and dtype of a weight (every expression op keeps its first argument's), or None."""
    value = ir.get_constant(gm, root(node)) if isinstance(node, fx.Node) else None
    return None if value is None else (value.shape, value.dtype)


def value(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a weight is: a constant's own, or an expression's computed now (a new tensor,
    which the caller frees by letting go of it); None when `node` is neither."""
    if not is_expression(node):
        return ir.get_constant(gm, node)

    def arg(a: Any) -> Any:
        return value(gm, a) if is_expression(a) else ir.get_constant(gm, a)

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg)
    with torch.no_grad():
        return node.target(*args, **kwargs)


def derive(gm: fx.GraphModule, op: Any, weight: fx.Node, others: list[Any], suffix: str, pass_name: str,
           before: fx.Node) -> fx.Node:
    """The expression `op(weight, *others)`, placed before `before` and named after the weight's
    parameter and `suffix` (`model_layers_0_self_attn_q_proj_weight_migrated`): a tensor in
    `others` becomes a new constant of that name + `_scale`; anything else (shared factor nodes,
    a flag) is passed as it is."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", f"{root(weight).meta.get(ir.FQN, root(weight).name)}_{suffix}")
    args: list[Any] = [weight]
    with gm.graph.inserting_before(before):
        for c in others:
            if isinstance(c, torch.Tensor):
                node = gm.graph.get_attr(ir.add_constant(gm, f"{stem}_scale", c))
                c = ir.mark_created(node, pass_name, [])  # not from `weight`: its meta names the user's parameter
            args.append(c)
        node = gm.graph.create_node("call_function", op, tuple(args), name=stem)
    ir.mark_created(node, pass_name, [weight])  # with the weight's meta: its parameter's name (q4_fqn)
    node.meta[WEIGHT_EXPRESSION] = True
    return node


def drop(gm: fx.GraphModule, node: Any) -> None:
    """Erase `node` if nothing reads it: a constant (`ir.drop_constant`), or an expression and
    then whatever of its arguments it was the last reader of."""
    if not is_expression(node):
        ir.drop_constant(gm, node)
        return
    if node.users:
        return
    inputs = [a for a in node.all_input_nodes]
    gm.graph.erase_node(node)
    for a in inputs:
        drop(gm, a)


def fold(gm: fx.GraphModule) -> int:
    """Replace every expression still read (a linear left in float) by a constant of its value,
    and drop the expressions; return how many became constants."""
    folded = 0
    for node in list(gm.graph.nodes):
        if not is_expression(node) or not node.users or all(is_expression(u) for u in node.users):
            continue
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(ir.add_constant(gm, f"{node.meta.get(ir.FQN, node.name)}_folded",
                                                      value(gm, node).contiguous()))
        ir.copy_meta(const, node)  # the parameter's name and source line; not WEIGHT_EXPRESSION
        ir.set_fake_value(const)
        node.replace_all_uses_with(const)
        drop(gm, node)
        folded += 1
    if folded:
        gm.recompile()
    return folded
