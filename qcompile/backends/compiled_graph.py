"""CompiledGraph: what the q4 backend made of one graph Dynamo captured, with its reports."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch import fx

from qcompile.backends.range_check import RangeMonitor
from qcompile.core import ir, qlinear
from qcompile.frontend.capture import PromptLimit
from qcompile.frontend.saved_artifact import Replay
from qcompile.passes.analyze_outliers import outlier_report

# How each form of linear runs, as the reports say it (a weight-only linear, fused or not, is not fake-quant)
FORMS = {qlinear.FUSED: "fused int4", qlinear.FAKE_QUANT: "fake-quant", qlinear.WEIGHT_ONLY: "weight-only int4",
         qlinear.FLOAT: "float"}


class CompiledGraph:
    """One compiled graph: the final graph module, its pipeline, its pass records, and the
    callable Dynamo runs (`__call__`). `replay` is what `qcompile.quantize(...).save()` writes
    for it (None when the graph was loaded from a saved artifact)."""

    def __init__(self, graph_module: fx.GraphModule, pipeline: str, records: list, run: Callable | None,
                 keep: list[int], graph_id: str, replay: Replay | None = None, limit: PromptLimit | None = None,
                 monitor: RangeMonitor | None = None):
        self.graph_module = graph_module
        self.pipeline = pipeline
        self.records = records
        self.graph_id = graph_id
        self.replay = replay
        self._run = run  # None when the backend stopped before lowering (`Q4Backend(stop_after=...)`)
        self._keep = keep  # the graph inputs that stay inputs (the rest were frozen)
        self._limit = limit  # a static KV cache's length, checked at each call
        self._monitor = monitor  # `run` also returns the activations' ranges, for the range check
        self._frozen: dict[int, torch.Tensor] = {}  # the parameters frozen into it, by input index
        self._versions: dict[int, tuple[str, int, int]] = {}  # their names, in-place versions and storages
        self._compile_for: Callable[[list], CompiledGraph] | None = None
        self._variants: dict[tuple, CompiledGraph] = {}
        self._lock = threading.Lock()

    def bind_parameters(self, frozen: dict[int, torch.Tensor], names: dict[int, str],
                        compile_for: Callable[[list], CompiledGraph]) -> None:
        """Say which parameters were frozen into this graph (and their names), and how to compile
        it for others.

        Dynamo shares one captured graph between module instances of one class, passing each
        instance's parameters as inputs: two models of one architecture in a process, or a layer
        Dynamo compiles on its own because its caller broke the graph (the same forward for
        every layer). This graph holds one instance's weights, so a call with another's
        parameters runs a graph compiled for those (`compile_for(inputs)`, once per instance and
        input shapes), never the wrong weights. A parameter changed in place after compiling
        (its version counter or storage moved) is an error: the graph holds its old value."""
        self._frozen, self._compile_for = frozen, compile_for
        self._versions = {i: (names[i], t._version, t.data_ptr()) for i, t in frozen.items()}

    def _check_unchanged(self) -> None:
        for i, t in self._frozen.items():
            name, version, pointer = self._versions[i]
            if t._version != version or t.data_ptr() != pointer:
                raise RuntimeError(
                    f"qcompile: parameter {name!r} was changed in place after graph {self.graph_id} quantized it; "
                    "the compiled model still holds its old value. Quantize the changed model again "
                    "(torch._dynamo.reset(), then torch.compile / qcompile.quantize)")

    def _variant(self, args: tuple) -> CompiledGraph:
        key = (tuple(id(args[i]) for i in self._frozen),
               tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in (args[i] for i in self._keep)))
        with self._lock:
            if key not in self._variants:
                if not self._variants:
                    warnings.warn(
                        f"qcompile: graph {self.graph_id} serves several module instances (two models of one class, "
                        "or a layer whose caller broke the graph); each instance gets a quantized graph of its own, "
                        "compiled at its first call with each input shape (slow; torch._dynamo.reset() between "
                        "models, or no graph break inside repeated layers, avoids it)", stacklevel=3)
                self._variants[key] = self._compile_for(list(args))
            return self._variants[key]

    def __call__(self, *args: Any) -> Any:
        if self._limit is not None:
            self._limit.check(args)
        if self._frozen:
            if any(args[i] is not t for i, t in self._frozen.items()):
                return self._variant(args)(*args)
            self._check_unchanged()
        with torch.no_grad():
            outputs = self._run(*[args[i] for i in self._keep])
        return outputs if self._monitor is None else self._monitor.split(outputs)

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
        float (and why), and what migrate-scales did with it (and why not); and one per other op
        that reads a constant weight and stays in float (insert-quantizers says why)."""
        rows = []
        for n in self.graph_module.graph.nodes:
            q = qlinear.match(n)
            g = qlinear.match_grouped(n) if q is None else None
            if g is not None and g.quantized:  # a mixture of experts' grouped GEMM, quantized
                record = n.meta.get(ir.QUANTIZED)
                runs_as = f"W{record.w_bits if record else 4}A{g.a_bits or 16} experts {FORMS[g.form]}"
                rows.append([qlinear.grouped_name(n), runs_as, "", "not migrated",
                             "migrate-scales and rotate-inputs take aten.linear groups only: a grouped expert "
                             "GEMM reads its input as it is (gate_up's is a row gather of the router's input: a "
                             "scale folded into the norm would also have to divide the router's columns)"])
                continue
            if q is None:
                if ir.FLOAT_REASON in n.meta:  # another op reading a weight (a grouped expert GEMM)
                    rows.append([qlinear.grouped_name(n), "float", n.meta[ir.FLOAT_REASON], "-", ""])
                continue
            migration = n.meta.get(ir.MIGRATION, {"status": "-", "reason": "no migration pass ran"})
            form = FORMS[q.form]
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
