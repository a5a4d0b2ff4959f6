"""Analyses: facts about a graph computed once and shared by the passes that read them (MLIR's
analysis manager, kept small).

    groups = get_analysis(gm, ActivationGroups)     # computed now, or the cached result

An analysis is a class whose constructor takes the graph module. Its result is cached per graph
module until a pass changes the graph: `QPass.__call__` calls `invalidate(gm)` after a pass that
reports `modified=True`, so the cache is right whether or not a pass manager runs the pass. A pass
that edits the graph reads its analyses before its first edit (they describe the graph it was
handed). As a guard against edits made outside any pass (a test, a backend stage), a cached result
is also recomputed when the graph's node count has changed.

The cache is keyed weakly by the graph module (never stored in it), so it neither keeps a graph
alive nor travels with a copied or saved one.
"""

from __future__ import annotations

import weakref
from typing import TypeVar

from torch import fx

from qcompile.core import qlinear

__all__ = ["get_analysis", "invalidate", "ActivationGroups"]

T = TypeVar("T")
# graph module -> {analysis class: (node count when computed, result)}
_CACHE: weakref.WeakKeyDictionary[fx.GraphModule, dict[type, tuple[int, object]]] = weakref.WeakKeyDictionary()


def get_analysis(gm: fx.GraphModule, kind: type[T]) -> T:
    """The result of analysis `kind` on `gm`: cached, or computed now as `kind(gm)`."""
    cached = _CACHE.setdefault(gm, {})
    size = len(gm.graph.nodes)
    if kind in cached and cached[kind][0] == size:
        return cached[kind][1]  # type: ignore[return-value]
    result = kind(gm)
    cached[kind] = (size, result)
    return result


def invalidate(gm: fx.GraphModule) -> None:
    """Drop every analysis cached for `gm` (its graph changed)."""
    _CACHE.pop(gm, None)


class ActivationGroups:
    """The float linears with a constant 2-D float weight (`qlinear.weight_shape`), grouped by
    the activation they read, in graph order: q/k/v share the normalized input, gate/up theirs.
    migrate-scales and rotate-inputs give each group one scale vector or one rotation.

        groups = get_analysis(gm, ActivationGroups)
        for activation, linears in groups.select(lambda lin: ...).items(): ...
    """

    def __init__(self, gm: fx.GraphModule):
        self.groups: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if qlinear.weight_shape(gm, node) is not None:
                self.groups.setdefault(node.args[0], []).append(node)

    def select(self, keep) -> dict[fx.Node, list[fx.Node]]:
        """The groups restricted to the linears `keep(linear)` accepts; empty groups dropped."""
        selected = {a: [lin for lin in linears if keep(lin)] for a, linears in self.groups.items()}
        return {a: linears for a, linears in selected.items() if linears}
