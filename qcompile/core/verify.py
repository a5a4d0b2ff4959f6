"""The IR verifier: `verify(gm)` checks torch.fx's own lint and qcompile's invariants.

An invariant is a small function `check(gm, node) -> str | None` that returns what is wrong at
`node`, or None; its name in errors is the function name in kebab-case. Two kinds:

- the IR's own, true of every graph, in the list `INVARIANTS` here (provenance, constants, the
  fused linear's operands);
- a pass's postconditions, declared by the pass (`QPass.invariants`, e.g. fold-scales'
  `per-channel-scales-are-folded`) and checked on every graph that pass has run on
  (`pass_api.passes_run`), collected from the registry: the verifier imports no pass.

The first violation raises `VerificationError` naming the invariant and the node with its source
line. The pass manager's `VerifyEach` runs `verify` after every pass that reported a change
(MLIR's --verify-each).
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.core import ir, qlinear
from qcompile.core.pass_api import Invariant, passes_run, registry

__all__ = ["VerificationError", "verify", "INVARIANTS", "Invariant"]


class VerificationError(RuntimeError):
    """An invariant of the IR does not hold; `invariant` and `node` say which and where."""

    def __init__(self, invariant: str, node: fx.Node | None, message: str):
        where = f" at {ir.describe(node)}" if node is not None else ""
        super().__init__(f"invariant {invariant!r} violated{where}: {message}")
        self.invariant = invariant
        self.node = node


def _op_name(node: fx.Node) -> str:
    """'q4.linear_w4a4.default' for a call to that op overload; '' for other nodes."""
    return str(node.target) if node.op == "call_function" else ""


def _constant(gm: fx.GraphModule, node: object) -> object:
    """The attribute a `get_attr` node reads (None if it is not one or the attribute is missing)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: object = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value


def provenance_names_a_registered_pass(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """`q4_provenance` meta, where present, is {"pass": <registered pass name>, "from": [...]}."""
    provenance = node.meta.get(ir.PROVENANCE)
    if provenance is None:
        return None
    name = provenance.get("pass") if isinstance(provenance, dict) else None
    if name not in registry():
        return f"{ir.PROVENANCE} names {name!r}, which is not a registered pass (meta: {provenance!r})"
    return None


def q4_op_has_provenance(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Every call to a `torch.ops.q4.*` op was made by a pass, which recorded itself."""
    if _op_name(node).startswith("q4.") and ir.PROVENANCE not in node.meta:
        return f"a call to {_op_name(node)} has no {ir.PROVENANCE} meta (which pass created it?)"
    return None


def get_attr_target_exists(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Every `get_attr` reads an attribute that exists on the module."""
    if node.op == "get_attr" and _constant(gm, node) is None:
        return f"the module has no attribute {node.target!r}"
    return None


def linear_w4a4_reads_constants(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """A fused linear (`q4.linear_w4a4(x_q, w_packed, w_step, a_step, ...)`, or its Triton twin)
    reads its packed uint8 weight and both steps from constants (checked on the module's
    attributes, not on meta); a dynamic activation step is a `q4.token_steps` of the run, and one
    that steps the first token apart is `where(sinks, sink_step, step)` of two constants; group
    multipliers, where there are any, are a uint8 constant too."""
    q = qlinear.match(node)
    if q is None or not q.fused:
        return None
    checked = [(1, "packed weight", q.packed), (2, "weight step", q.w_step), (3, "activation step", q.a_step)]
    if q.dynamic:
        checked = checked[:2]
    elif q.sink_steps is not None:
        checked[2:] = [(3, "first token's activation step", q.sink_steps[0]), (3, "activation step", q.sink_steps[1])]
    if q.w_mult is not None:
        checked.append((7, "group multiplier tensor", q.w_mult))
    for index, role, arg in checked:
        value = _constant(gm, arg)
        if not isinstance(value, torch.Tensor):
            return f"its {role} (argument {index}) is not a get_attr constant tensor: {arg!r}"
        if index in (1, 7) and value.dtype != torch.uint8:
            return f"its {role} {arg.target!r} has dtype {value.dtype}, expected torch.uint8"
    return None


INVARIANTS: list[Invariant] = [
    provenance_names_a_registered_pass,
    q4_op_has_provenance,
    get_attr_target_exists,
    linear_w4a4_reads_constants,
]


def _pass_invariants(gm: fx.GraphModule) -> list[Invariant]:
    """The invariants declared by the registered passes that have run on `gm`, each once."""
    passes = registry()
    found: list[Invariant] = []
    for name in passes_run(gm):
        for check in getattr(passes.get(name), "invariants", ()):
            if check not in found:
                found.append(check)
    return found


def verify(gm: fx.GraphModule) -> None:
    """Raise `VerificationError` at the first violated invariant; then run `graph.lint()`."""
    # qcompile's invariants first: they name the node and the rule, which lint's messages don't.
    invariants = [*INVARIANTS, *_pass_invariants(gm)]
    for node in gm.graph.nodes:
        for invariant in invariants:
            problem = invariant(gm, node)
            if problem is not None:
                raise VerificationError(invariant.__name__.replace("_", "-"), node, problem)
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises plain RuntimeError/AssertionError
        raise VerificationError("graph-lint", None, str(e)) from e
