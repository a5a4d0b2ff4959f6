"""CompiledGraph: what the q4 backend made of one graph Dynamo captured, with its reports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch import fx

from qcompile.core import ir, qlinear
from qcompile.frontend.capture import PromptLimit
from qcompile.frontend.saved_artifact import Replay
from qcompile.passes.analyze_outliers import outlier_report


class CompiledGraph:
    """One compiled graph: the final graph module, its pipeline, its pass records, and the
    callable Dynamo runs (`__call__`). `replay` is what `qcompile.quantize(...).save()` writes
    for it (None when the graph was loaded from a saved artifact)."""

    def __init__(self, graph_module: fx.GraphModule, pipeline: str, records: list, run: Callable | None,
                 keep: list[int], graph_id: str, replay: Replay | None = None, limit: PromptLimit | None = None):
        self.graph_module = graph_module
        self.pipeline = pipeline
        self.records = records
        self.graph_id = graph_id
        self.replay = replay
        self._run = run  # None when the backend stopped before lowering (`Q4Backend(stop_after=...)`)
        self._keep = keep  # the graph inputs that stay inputs (the rest were frozen)
        self._limit = limit  # a static KV cache's length, checked at each call

    def __call__(self, *args: Any) -> Any:
        if self._limit is not None:
            self._limit.check(args)
        with torch.no_grad():
            return self._run(*[args[i] for i in self._keep])

    def count_ops(self, op: Any) -> int:
        """How many nodes of the final graph call `op` (an OpOverload or OpOverloadPacket)."""
        return sum(
            1
            for n in self.graph_module.graph.nodes
            if n.op == "call_function" and (n.target is op or getattr(n.target, "overloadpacket", None) is op)
        )

    def outlier_report(self, worst: int | None = None) -> str:
        """Table of the linears' input outliers, worst first (needs analyze-outliers in the pipeline)."""
        return outlier_report(self.graph_module, worst)

    def migration_report(self) -> str:
        """One row per linear of the final graph: its module, whether it was quantized or left in
        float (and why), and what migrate-scales did with it (and why not)."""
        rows = []
        for n in self.graph_module.graph.nodes:
            q = qlinear.match(n)
            if q is None:
                continue
            migration = n.meta.get(ir.MIGRATION, {"status": "-", "reason": "no migration pass ran"})
            form = "fused int4" if q.fused else "fake-quant" if q.quantized else "float"
            rows.append([ir.module_path(n) or n.name, form, n.meta.get(ir.FLOAT_REASON, ""),
                         migration["status"], migration["reason"]])
        return tabulate(rows, headers=["linear", "runs as", "why float", "migration", "detail"])

    def quantized_weight_bytes(self) -> int:
        """Bytes held by packed weights, their steps and group multipliers (constants read by q4 ops)."""
        seen: set[str] = set()
        total = 0
        for n in self.graph_module.graph.nodes:
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "q4":
                for arg in (*n.args, *n.kwargs.values()):
                    t = ir.get_constant(self.graph_module, arg)
                    if t is not None and arg.target not in seen:
                        seen.add(arg.target)
                        total += t.numel() * t.element_size()
        return total
