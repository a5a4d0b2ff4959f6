"""Pattern rewrites for passes: replace every match of a small ATen subgraph with another one.

A pattern and its replacement are plain Python functions over ATen ops, traced with
`torch.fx.symbolic_trace`; matching and replacing is torch.fx's subgraph rewriter
(`torch.fx.subgraph_rewriter.replace_pattern_with_filters`). This module adds what a qcompile
pass needs around it: a `check` that sees each match in a friendly form, provenance on every
node it creates, and a valid graph afterwards::

    def pattern(x, p):
        return aten.dropout.default(x, p, False)     # train=False must match exactly

    def replacement(x, p):                           # the same parameters as the pattern
        return x

    n = rewrite(gm, pattern, replacement, check=lambda m: m.inputs["p"] < 0.5, pass_name=self.name)

Or, as a whole pass, subclass `PatternPass` and declare `pattern`, `replacement` (and `check`)
as methods: `call` is done for you (`examples/custom_pass.py` is one).

How a pattern matches (torch.fx's rules):

- ops match by target (`aten.dropout.default` is not `aten.dropout`: use the overload the IR
  holds, see a printed graph); the pattern's parameters are wildcards: each binds to one graph
  node or to one literal argument (a number, a bool, a list such as `[16]`, or None), and
  `PatternMatch.inputs` hands it to `check` under the parameter's name;
- literals written in the pattern (`False` above) must be equal in the graph, type included
  (`0.1` does not match `0`); with `ignore_literals=True` every literal is a wildcard instead,
  so to match any value of one argument and keep the others exact, make that argument a
  parameter rather than ignoring literals;
- a pattern's inner nodes must have no users outside the match (its result may have any);
  matches never overlap (the first in graph order wins), and `check` only sees those;
- a pattern must use every parameter, a replacement takes the same parameters in the same order
  and may ignore some; a replacement that creates tensor constants is refused (make them with
  `ir.add_constant` in a pass that walks nodes).

After the rewrites, every node the replacement created carries `q4_provenance = {"pass":
pass_name, "from": [the replaced nodes, the match's result first]}` and the module path and
source line of the node whose result it took over (`ir.mark_created`), nodes that only fed the
replaced ones and are now unused are deleted, and the graph module is recompiled.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from qcompile.core import ir
from qcompile.core.pass_api import PassResult, QPass

__all__ = ["PatternMatch", "rewrite", "PatternPass"]


@dataclasses.dataclass(frozen=True)
class PatternMatch:
    """One place where a pattern matched, as `check` sees it (before anything is replaced).

    `anchor`: the graph node the pattern's result matched, the node the replacement takes over
    (for a pattern returning several values, the first). `nodes`: the matched graph nodes of the
    pattern's ops, by the names the traced pattern gave them (`"dropout_default"`; print
    `torch.fx.symbolic_trace(pattern).graph` to see them). `inputs`: what each pattern parameter
    bound to, by parameter name: a graph node or a literal (`{"x": %layer_norm, "p": 0.1}`).
    """

    graph_module: fx.GraphModule
    anchor: fx.Node
    nodes: Mapping[str, fx.Node]
    inputs: Mapping[str, Any]

    def constant(self, name: str) -> Any:
        """The value of parameter `name` when it is known now: a literal, a `get_attr` tensor or
        a short chain of ops over constants (`ir.constant_value`); None otherwise."""
        return ir.constant_value(self.graph_module, self.inputs[name])


def _trace(fn: Callable[..., Any]) -> fx.GraphModule:
    """`fn` (a function, or a method whose `self` is baked in) as a traced graph module."""
    if inspect.ismethod(fn):
        first = next(iter(inspect.signature(fn.__func__).parameters))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not add an assertion for the concrete input"
            gm = fx.symbolic_trace(fn.__func__, concrete_args={first: fn.__self__})
        baked = next(n for n in gm.graph.nodes if n.op == "placeholder")  # fx keeps one for `self`
        if not baked.users:
            gm.graph.erase_node(baked)
        return gm
    return fx.symbolic_trace(fn)


def _flat_nodes(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat_nodes(v)]
    return [value]


def _delete_dead(gm: fx.GraphModule, candidates: list[fx.Node]) -> None:
    """Delete the nodes among `candidates` (and their inputs, transitively) that nothing uses any
    more; constants no node reads are dropped from the module too."""
    erased_constant = False
    work = [n for n in candidates if isinstance(n, fx.Node)]
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.users or node.op in ("placeholder", "output") or node.is_impure():
            continue
        inputs = node.all_input_nodes
        erased_constant |= node.op == "get_attr"
        gm.graph.erase_node(node)
        work.extend(inputs)
    if erased_constant:
        ir.delete_unused_constants(gm)


def rewrite(gm: fx.GraphModule, pattern: Callable[..., Any], replacement: Callable[..., Any],
            check: Callable[[PatternMatch], bool] | None = None, *, pass_name: str,
            ignore_literals: bool = False) -> int:
    """Replace every match of `pattern` in `gm` with `replacement` where `check(match)` is true
    (everywhere without a check); return the number of matches replaced.

    `pass_name` names the pass in the provenance of the nodes created (a registered pass name:
    the verifier checks it). `ignore_literals`: every literal of the pattern matches any value.
    The graph is edited in place and recompiled; a rewrite count of 0 leaves it untouched.
    """
    pattern_gm, replacement_gm = _trace(pattern), _trace(replacement)
    if any(n.op == "get_attr" for n in replacement_gm.graph.nodes):
        raise TypeError(f"pass {pass_name!r}: a replacement may not create tensor constants "
                        "(use ir.add_constant in a pass that walks the nodes)")
    placeholders = [n for n in pattern_gm.graph.nodes if n.op == "placeholder"]
    params = [n.target for n in placeholders]
    ops = [n for n in pattern_gm.graph.nodes if n.op not in ("placeholder", "output")]
    pattern_out = next(n for n in pattern_gm.graph.nodes if n.op == "output")
    pattern_results = [n for n in _flat_nodes(pattern_out.args[0]) if isinstance(n, fx.Node)]
    if not pattern_results or pattern_results[0].op == "placeholder":
        raise TypeError(f"pass {pass_name!r}: a pattern must return the result of an op")

    def friendly(m: Any) -> PatternMatch:
        return PatternMatch(gm, m.nodes_map[pattern_results[0]], {n.name: m.nodes_map[n] for n in ops},
                            dict(zip(params, m.placeholder_nodes)))

    filters = [] if check is None else [lambda m, _graph, _pattern: bool(check(friendly(m)))]
    replaced = replace_pattern_with_filters(gm, pattern_gm.graph, replacement_gm.graph, filters,
                                            ignore_literals=ignore_literals)
    if not replaced:
        return 0

    # The replacement's ops, in order, are the nodes each rewrite created (`replacements`).
    repl_ops = [n for n in replacement_gm.graph.nodes if n.op not in ("placeholder", "output")]
    repl_out = next(n for n in replacement_gm.graph.nodes if n.op == "output")
    repl_results = _flat_nodes(repl_out.args[0])
    inputs: list[fx.Node] = []
    for r in replaced:
        old_results = [r.nodes_map[n] for n in pattern_results]
        removed = old_results + [r.nodes_map[n] for n in ops if r.nodes_map[n] not in old_results]
        created = dict(zip(repl_ops, r.replacements)) if len(r.replacements) == len(repl_ops) else {}
        # A replacement op calling what a pattern op called takes over that node's meta (its
        # calibration, `val`, module path, source line), pairing them in order; other new nodes
        # take the meta of the match's result.
        unpaired = [(n.target, r.nodes_map[n]) for n in ops]
        for repl, new in created.items():
            pair = next((p for p in unpaired if p[0] == repl.target), None)
            if pair is not None:
                unpaired.remove(pair)
                new.meta.update({k: v for k, v in pair[1].meta.items() if k != ir.PROVENANCE})
                ir.mark_created(new, pass_name, [pair[1]] + [n for n in removed if n is not pair[1]])
        for new in r.replacements:
            if ir.PROVENANCE not in new.meta:
                ir.mark_created(new, pass_name, removed)
        for old, repl in zip(old_results, repl_results):
            new = created.get(repl)
            if new is not None and "val" in old.meta:
                new.meta["val"] = old.meta["val"]  # the same value as the node it replaces
        inputs.extend(r.nodes_map[p] for p in placeholders if isinstance(r.nodes_map[p], fx.Node))
    _delete_dead(gm, inputs)
    gm.graph.lint()
    gm.recompile()
    return len(replaced)


class PatternPass(QPass):
    """A pass that is one pattern rewrite. Declare `pattern` and `replacement` as methods (and
    `check`, to filter matches); each rewrite counts in the pass's first declared statistic::

        @register_pass
        class RemoveEvalDropout(PatternPass):
            name = "remove-eval-dropout"
            summary = "..."
            statistics = ("dropouts-removed",)

            def pattern(self, x, p):
                return aten.dropout.default(x, p, False)

            def replacement(self, x, p):
                return x

    The methods may read `self.options` (a literal taken from an option is baked into the
    pattern). While `check` runs, `current_node` is the match's anchor, so a failure names it.
    """

    ignore_literals: ClassVar[bool] = False

    def pattern(self, *args: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def replacement(self, *args: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, match: PatternMatch) -> bool:
        """Whether to rewrite this match (default: every match)."""
        return True

    def _check(self, match: PatternMatch) -> bool:
        self.current_node = match.anchor
        return self.check(match)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        n = rewrite(graph_module, self.pattern, self.replacement, self._check, pass_name=self.name,
                    ignore_literals=self.ignore_literals)
        self.current_node = None
        if self.statistics:
            self.count(self.statistics[0], n)
        return PassResult(graph_module, n > 0)
