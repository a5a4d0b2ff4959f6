"""Explain what the q4 backend does to a model, linear by linear, without compiling it.

    report = explain(model, {"input_ids": ids}, recipe="w4a4")      # same options as torch.compile
    print(report)                        # pass table, linear table, summary, pipeline
    report.linears[0].sqnr_db            # rows as dataclasses; report.to_dict() for JSON

    qcompile explain [--recipe w4a4] [--pipeline TEXT] [--tokens 256] [--json FILE]

`explain` runs the q4 backend's front half (`qcompile.backends.q4.prepare`: capture, normalize,
freeze, calibrate) and the pipeline `options` ask for (`q4.build_pipeline`: recipe or `pipeline`,
`disable`, `rounding`, `unmatched`; the `Q4_*` environment too, as torch.compile(backend="q4")
reads it) under a pass manager. It does not lower the final graph and does not compile or run
the quantized model: it interprets the final graph once on the example inputs (an
`fx.Interpreter`) to measure each linear. Calibration batches default to the example inputs
(one batch), as q4 calibrates on the first call's inputs when given none.

How the capture stops: explain's own Dynamo backend analyzes each graph and returns the float
graph's own `forward`, so the example call then runs that captured float graph once (it is
cheap next to calibration). This is what lets a model with graph breaks be explained: Dynamo
only captures the graph after a break once the one before it has run. Each graph is reported on
its own (`report.graphs`); the linear rows say which graph they come from. Graphs after a break
calibrate on the example inputs as they reach them (q4 does the same without `calibration`),
and an explicit `calibration` option is refused there as q4 refuses it.

Per linear of the final graph (one row per `aten.linear` or `q4.linear_w4a4`, named by the
user's module path, `model.layers.0.self_attn.q_proj`):

runs as          `W4A4 fused` / `W4A8 fused` (q4.linear_w4a4), `W4A4 fake-quant` (quantized but
                 not fused: fuse-kernels disabled), `W4A16 weight-only`, `W4A4 not rounded`
                 (insert-quantizers{rounding=false}: the float function, measured as if
                 quantized), or `float` with the reason insert-quantizers gave (`q4_float_reason`)
outliers before  max over channels of absmax / median channel absmax of the linear's input on the
                 calibration data, before migration and rotation (analyze-outliers' `q4_outliers`;
                 '-' when that pass did not run)
outliers after   the same ratio measured on the example inputs for the activation that actually
                 enters the linear's activation quantizer in the final graph (after migration,
                 folding and rotation); for linears without one, its float input
SQNR dB          the linear's LOCAL quantization error on the example inputs:
                 10 * log10(sum(y_ref**2) / sum((y_ref - y_q)**2)), where y_q is the final
                 graph's quantized linear output and y_ref = F.linear(x, W, b) with x the float
                 activation that enters the linear's quantizer in the final graph (the same x the
                 quantized linear reads, so error from upstream layers does not accumulate into
                 it) and W, b the float weight and bias as they were just before the first
                 insert-quantizers pass ran (after migration, rotation and folding: the function
                 the quantizers approximate). inf when nothing was rounded; None ('-') for linears
                 left in float.

Final-graph linears are matched to those float weights through `q4_provenance` (insert-quantizers
and fuse-kernels name the nodes they replaced), falling back to the module path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import statistics
import sys
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import fx

from qcompile.core import ir
from qcompile.core.config import Q4Options, resolve_options
from qcompile.core.instrument import Instrument
from qcompile.core.pass_api import PassResult, QPass
from qcompile.core.pass_manager import PassManager
from qcompile.core.pipeline import Pipeline

__all__ = ["explain", "ExplainReport", "GraphReport", "LinearRow", "PassRow", "main"]

_INSERT = "insert-quantizers"


def _q4():
    from qcompile.kernels import ops as _ops  # noqa: F401  (registers torch.ops.q4)

    return torch.ops.q4


# --- the report ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PassRow:
    """One pass of one graph's pipeline run."""

    graph: int  # index of the graph in `ExplainReport.graphs`
    index: int  # position in the pipeline
    name: str
    spec: str  # the pass as written in the pipeline (`insert-quantizers{w-bits=4}`)
    options: str  # all its effective options (`w-bits=4,a-bits=4,skip=lm_head,...`)
    seconds: float
    changed: bool
    stats: dict[str, int]


@dataclasses.dataclass(frozen=True)
class LinearRow:
    """One linear of a final graph (see the module docstring for the columns)."""

    graph: int
    module: str  # the user's module path, or the node name when the graph has none
    runs_as: str
    w_bits: int | None  # None: float
    a_bits: int | None  # None: float; 16: float activations (weight-only)
    float_reason: str  # '' unless it runs in float
    migration: str  # what migrate-scales did: 'migrated', 'unmatched' or '-' (no migration pass)
    outliers_before: float | None
    outliers_after: float | None
    sqnr_db: float | None
    node: str  # its node in the final graph

    @property
    def quantized(self) -> bool:
        """Whether its weight is rounded (fused, fake-quant or weight-only)."""
        return self.w_bits is not None and not self.runs_as.endswith("not rounded")


@dataclasses.dataclass
class GraphReport:
    """What happened to one Dynamo graph."""

    index: int
    graph_id: str  # Dynamo's compile id ("0-0")
    passes: list[PassRow]
    linears: list[LinearRow]


def _fmt_db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else f"{value:.2f}"


def _json_float(value: float | None) -> float | str | None:
    """JSON has no infinity: inf becomes the string 'inf'."""
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf" if value < 0 else "nan"


@dataclasses.dataclass
class ExplainReport:
    """The passes and the linears of every graph of one explained model.

    `pipeline` is the pipeline text that ran: `explain(model, inputs, pipeline=report.pipeline)`
    (or `Q4_PIPELINE='<it>'`) runs the same passes again.
    """

    pipeline: str
    graphs: list[GraphReport]

    @property
    def passes(self) -> list[PassRow]:
        return [row for g in self.graphs for row in g.passes]

    @property
    def linears(self) -> list[LinearRow]:
        return [row for g in self.graphs for row in g.linears]

    def linear(self, module: str) -> LinearRow:
        """The row of the linear at this module path (the first, if a module runs twice)."""
        for row in self.linears:
            if row.module == module:
                return row
        raise KeyError(f"no linear {module!r} in the report")

    def summary(self) -> str:
        rows = self.linears
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.runs_as] = counts.get(row.runs_as, 0) + 1
        quantized = sum(r.quantized for r in rows)
        floats = sum(r.w_bits is None for r in rows)
        parts = [f"{len(rows)} linears in {len(self.graphs)} graph{'s' if len(self.graphs) != 1 else ''}: "
                 f"{quantized} quantized, {floats} float"
                 + (f", {len(rows) - quantized - floats} not rounded" if len(rows) - quantized - floats else "")
                 + " (" + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"]
        measured = [r for r in rows if r.sqnr_db is not None]
        if measured:
            worst = min(measured, key=lambda r: r.sqnr_db)
            best = max(measured, key=lambda r: r.sqnr_db)
            median = statistics.median(r.sqnr_db for r in measured)
            parts.append(f"SQNR median {_fmt_db(median)} dB, min {_fmt_db(worst.sqnr_db)} dB ({worst.module}), "
                         f"max {_fmt_db(best.sqnr_db)} dB ({best.module})")
        return "; ".join(parts)

    def pass_table(self) -> str:
        many = len(self.graphs) > 1
        table = [([row.graph] if many else []) + [row.index, row.spec, row.seconds, "yes" if row.changed else "no",
                                                   ", ".join(f"{k}={v}" for k, v in row.stats.items() if v)]
                 for row in self.passes]
        headers = (["graph"] if many else []) + ["#", "pass", "seconds", "changed", "statistics"]
        return tabulate(table, headers=headers, floatfmt=".3f")

    def linear_table(self, rows: list[LinearRow] | None = None) -> str:
        many = len(self.graphs) > 1
        rows = self.linears if rows is None else rows
        table = [([r.graph] if many else []) + [
            r.module, r.runs_as, r.float_reason, r.migration,
            "-" if r.outliers_before is None else f"{r.outliers_before:.1f}",
            "-" if r.outliers_after is None else f"{r.outliers_after:.1f}",
            _fmt_db(r.sqnr_db)] for r in rows]
        headers = (["graph"] if many else []) + ["linear", "runs as", "why float", "migration",
                                                  "outliers before", "outliers after", "SQNR dB"]
        return tabulate(table, headers=headers, disable_numparse=True)

    def __str__(self) -> str:
        return "\n\n".join([
            "passes:\n" + self.pass_table(),
            "linears (outliers: max / median channel absmax of the input; SQNR: the linear alone, "
            "on the example inputs):\n" + self.linear_table(),
            "summary: " + self.summary(),
            f"pipeline: Q4_PIPELINE='{self.pipeline}'",
        ])

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (inf SQNR as the string 'inf')."""
        def linear(row: LinearRow) -> dict:
            d = dataclasses.asdict(row)
            d.update({k: _json_float(d[k]) for k in ("outliers_before", "outliers_after", "sqnr_db")})
            d["quantized"] = row.quantized
            return d

        return {
            "pipeline": self.pipeline,
            "summary": self.summary(),
            "graphs": [{"index": g.index, "graph_id": g.graph_id,
                        "passes": [dataclasses.asdict(p) for p in g.passes],
                        "linears": [linear(r) for r in g.linears]} for g in self.graphs],
        }


# --- what the pass manager saw ---------------------------------------------------------------------


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is ir.aten.linear.default or node.target is _q4().linear_w4a4.default)


@dataclasses.dataclass
class _Reference:
    """A linear as it was just before the first insert-quantizers pass."""

    module: str
    weight: torch.Tensor | None  # None: not a constant
    bias: torch.Tensor | None
    bias_is_constant: bool


class _Recorder(Instrument):
    """Snapshots each linear's float weight before the first insert-quantizers pass, then follows
    every linear through later passes by `q4_provenance` (node name -> its original name), and
    records which insert-quantizers run rounded it."""

    def __init__(self) -> None:
        self.references: dict[str, _Reference] | None = None  # by original node name
        self.origin: dict[str, str] = {}  # node name -> original node name
        self.quantized_by: dict[str, Any] = {}  # original name -> the insert-quantizers options
        # original name -> the options of the insert-quantizers{rounding=false} run that took it
        self.unrounded_by: dict[str, Any] = {}
        self._stashed: dict[fx.Node, str] = {}

    def before_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> None:
        if qpass.name != _INSERT:
            return
        if not qpass.options.rounding:
            # Which linears a rounding=false run takes shows only as the reason it did NOT set
            # (a later run's skip= sets one on a linear an earlier run took): set reasons aside
            # for the pass (which never reads them) and put back those it leaves alone.
            self._stashed = {n: n.meta.pop(ir.FLOAT_REASON) for n in gm.graph.nodes if ir.FLOAT_REASON in n.meta}
        if self.references is not None:
            return
        self.references = {}
        for node in gm.graph.nodes:
            if not (node.op == "call_function" and node.target is ir.aten.linear.default):
                continue
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias_value = ir.get_constant(gm, bias) if isinstance(bias, fx.Node) else None
            self.references[node.name] = _Reference(
                ir.module_path(node), ir.get_constant(gm, node.args[1]), bias_value,
                bias is None or bias_value is not None)
            self.origin[node.name] = node.name

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        if self.references is None:
            return
        for node in gm.graph.nodes:
            if not _is_linear(node):
                continue
            if node.name not in self.origin:
                sources = node.meta.get(ir.PROVENANCE, {}).get("from", [])
                found = next((self.origin[s] for s in sources if s in self.origin), None)
                if found is None:
                    continue
                self.origin[node.name] = found
            original = self.origin[node.name]
            if qpass.name == _INSERT and original not in self.quantized_by and _weight_dequantize(node) is not None:
                self.quantized_by[original] = qpass.options
        if qpass.name == _INSERT and not qpass.options.rounding:
            only = re.compile(qpass.options.only) if qpass.options.only else None
            for node in gm.graph.nodes:
                original = self.origin.get(node.name)
                if (original is not None and node.target is ir.aten.linear.default
                        and ir.FLOAT_REASON not in node.meta and _weight_dequantize(node) is None
                        and (only is None or only.search(ir.linear_module_path(node)))):
                    self.unrounded_by.setdefault(original, qpass.options)
            self._restore()

    def on_failure(self, index: int, qpass: QPass, gm: fx.GraphModule, exc: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for node, reason in self._stashed.items():
            node.meta.setdefault(ir.FLOAT_REASON, reason)
        self._stashed = {}


def _weight_dequantize(node: fx.Node) -> fx.Node | None:
    w = node.args[1] if node.target is ir.aten.linear.default else None
    return w if isinstance(w, fx.Node) and w.target is _q4().dequantize_weight_int4.default else None


# --- measuring the final graph ---------------------------------------------------------------------


@dataclasses.dataclass
class _Probe:
    node: fx.Node
    x: fx.Node  # the float activation that enters its quantizer (or the linear itself)
    reference: _Reference | None  # None: no SQNR (float)
    bias: Any  # the final node's bias argument
    ratio: float | None = None
    sqnr: float | None = None


class _Measure(fx.Interpreter):
    """Runs the final graph, measuring each probed linear as it runs (`run_node`)."""

    def __init__(self, gm: fx.GraphModule, probes: dict[fx.Node, _Probe]):
        super().__init__(gm)
        self.probes = probes
        self.pending: dict[fx.Node, int] = {}
        for p in probes.values():
            self.pending[p.x] = self.pending.get(p.x, 0) + 1
        self.saved: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.pending:  # the interpreter frees it after its last user, maybe before the linear
            self.saved[n] = out
        probe = self.probes.get(n)
        if probe is not None:
            x = self.saved[probe.x]
            self.pending[probe.x] -= 1
            if not self.pending[probe.x]:
                del self.saved[probe.x]
            probe.ratio = _outlier_ratio(x)
            ref = probe.reference
            if ref is not None and ref.weight is not None:
                if ref.bias_is_constant:
                    bias = ref.bias
                else:
                    bias = self.env[probe.bias] if isinstance(probe.bias, fx.Node) else probe.bias
                y_ref = F.linear(x, ref.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
                probe.sqnr = _sqnr(y_ref, out)
        return out


def _outlier_ratio(x: torch.Tensor) -> float | None:
    if x.numel() == 0:
        return None
    absmax = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    median = absmax.median().item()
    return absmax.max().item() / median if median > 0 else None


def _sqnr(y_ref: torch.Tensor, y_q: torch.Tensor) -> float:
    ref = y_ref.double()
    signal = ref.square().sum().item()
    noise = (ref - y_q.double()).square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _probe_input(node: fx.Node) -> tuple[fx.Node, int | None, Any]:
    """(the float activation entering the quantizer, activation bits or None, bias argument)."""
    q4 = _q4()
    if node.target is q4.linear_w4a4.default:
        x_q = node.args[0]
        return x_q.args[0], x_q.args[2], node.args[4]
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(x, fx.Node) and x.target is q4.dequantize_per_tensor.default:
        x_q = x.args[0]
        if isinstance(x_q, fx.Node) and x_q.target is q4.quantize_per_tensor.default:
            return x_q.args[0], x_q.args[2], bias
    return x, None, bias


def _float_reason(node: fx.Node, recorder: _Recorder) -> str:
    reason = node.meta.get(ir.FLOAT_REASON)
    if reason:
        return reason
    if recorder.references is None:
        return "no insert-quantizers pass in the pipeline"
    return "no insert-quantizers run took it (see their only=/skip=)"


def _rows(final_gm: fx.GraphModule, inputs: list[Any], recorder: _Recorder, graph: int) -> list[LinearRow]:
    q4 = _q4()
    probes: dict[fx.Node, _Probe] = {}
    described: list[tuple[fx.Node, dict]] = []
    refs = recorder.references or {}
    by_module = {}
    for name, ref in refs.items():
        by_module.setdefault(ref.module, []).append(name)
    for node in final_gm.graph.nodes:
        if not _is_linear(node):
            continue
        module = ir.module_path(node) or node.name
        original = recorder.origin.get(node.name)
        if original is None and len(by_module.get(module, ())) == 1:
            original = by_module[module][0]  # provenance lost: the module path is unambiguous
        reference = refs.get(original) if original is not None else None
        options = recorder.quantized_by.get(original)
        x, a_bits, bias = _probe_input(node)
        fused = node.target is q4.linear_w4a4.default
        rounded = fused or _weight_dequantize(node) is not None
        w_bits = options.w_bits if options is not None else None
        reason = ""
        if rounded:
            a_bits = a_bits if a_bits is not None else 16
            kind = "fused" if fused else "fake-quant" if a_bits != 16 else "weight-only"
            runs_as = f"W{w_bits if w_bits is not None else '?'}A{a_bits} {kind}"
            w_bits = w_bits if w_bits is not None else 4  # packed int4 storage
        elif original in recorder.unrounded_by and reference is not None and reference.weight is not None:
            unrounded = recorder.unrounded_by[original]
            w_bits, a_bits = unrounded.w_bits, unrounded.a_bits
            runs_as = f"W{w_bits}A{a_bits} not rounded"
        else:
            runs_as, w_bits, a_bits = "float", None, None
            reason = _float_reason(node, recorder)
        measured = reference if w_bits is not None else None
        probes[node] = _Probe(node, x, measured, bias)
        migration = node.meta.get(ir.MIGRATION, {}).get("status", "-")
        outliers = node.meta.get(ir.OUTLIERS)
        described.append((node, dict(graph=graph, module=module, runs_as=runs_as, w_bits=w_bits, a_bits=a_bits,
                                     float_reason=reason, migration=migration,
                                     outliers_before=None if outliers is None else outliers.max_ratio,
                                     node=node.name)))
    if probes:
        with torch.no_grad():
            _Measure(final_gm, probes).run(*inputs)
    return [LinearRow(**fields, outliers_after=probes[node].ratio, sqnr_db=probes[node].sqnr)
            for node, fields in described]


# --- running the front half and the pipeline -------------------------------------------------------


class _Failed(Exception):
    """Carries an error raised inside explain's backend past Dynamo's wrapping."""


@contextlib.contextmanager
def _private_stats_cache():
    """q4 caches calibration statistics per weight parameter for the life of the model; explain
    calibrates afresh and leaves nothing behind (a SmolLM2 run's Gram matrices are ~0.5 GB)."""
    from qcompile.backends import q4

    saved = q4._STATS_CACHE
    q4._STATS_CACHE = type(saved)()
    try:
        yield
    finally:
        q4._STATS_CACHE = saved


class _Backend:
    """explain's Dynamo backend: prepare + passes + measure each graph, then run it in float."""

    def __init__(self, opts: Q4Options, pipeline: Pipeline, default_calibration: bool):
        self.opts = opts
        self.pipeline = pipeline
        self.default_calibration = default_calibration
        self.graphs: list[GraphReport] = []
        self.error: BaseException | None = None

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        try:
            self.graphs.append(self._explain(gm, list(example_inputs)))
        except BaseException as e:  # noqa: BLE001 - re-raised by explain() unwrapped
            self.error = e
            raise
        return gm.forward

    def _explain(self, gm: fx.GraphModule, example_inputs: list[Any]) -> GraphReport:
        from qcompile.backends import q4

        frame_locals, frame_code = q4._compiled_frame()
        opts = self.opts
        resumed = frame_code is not None and frame_code.co_name.startswith("torch_dynamo_resume_in")
        if resumed and self.default_calibration:
            opts = dataclasses.replace(opts, calibration=None)  # this graph's inputs on the example call
        recorder = _Recorder()
        base = PassManager.from_options(self.pipeline, opts, stream=sys.stderr)
        manager = PassManager(self.pipeline, [*base.instruments, recorder], stream=sys.stderr)
        needs = self.pipeline.calibration_needs()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="qcompile: no calibration data given")
            prepared = q4.prepare(gm, example_inputs, opts, frame_locals, frame_code, manager.on_stage, needs)
        with torch.no_grad():
            result = manager.run(prepared.graph_module)
        index = len(self.graphs)
        graph_id = str(gm.meta.get("dynamo_compile_id", index)).replace("/", "-")
        passes = [PassRow(index, i, r.name, str(self.pipeline[i]), r.options, r.seconds, r.modified, dict(r.stats))
                  for i, r in enumerate(result.records)]
        inputs = [example_inputs[i] for i in prepared.keep]
        return GraphReport(index, graph_id, passes, _rows(result.graph_module, inputs, recorder, index))


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("explain(): a dict of example inputs must have str keys (the model's keyword arguments)")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"explain(): example_inputs must be a tuple of positional arguments, a dict of keyword "
                    f"arguments or a tensor, got {type(example_inputs).__name__}")


def explain(model: torch.nn.Module, example_inputs: Any, **options: Any) -> ExplainReport:
    """Run q4's front half and pipeline on `model` and report every pass and linear.

    `example_inputs`: a tuple of positional arguments, a dict of keyword arguments
    (`{"input_ids": ids}`) or one tensor. `options`: those of torch.compile(backend="q4",
    options=...) (`recipe`, `calibration`, `pipeline`, `disable`, `rounding`, ...; the `Q4_*`
    environment overrides them as it does there); `calibration` defaults to the example inputs.
    Lowering options are accepted and have no effect. The model is only read.

    Per-linear SQNR is local to the linear (see the module docstring): the final graph's
    quantized output against F.linear(x, W, b) on the same float input x, W and b the float
    weight and bias just before the first insert-quantizers pass, on the example inputs. Those
    float weights are held until the report is made (peak memory: about the model's linear
    weights twice).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"explain() needs a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    if model.training:
        warnings.warn("explain(): the model is in training mode (dropout makes calibration and the "
                      "measurements random); call model.eval() first", stacklevel=2)
    opts = resolve_options(options)
    from qcompile.backends import q4

    pipeline = q4.build_pipeline(opts)  # an unknown recipe or a bad pipeline fails here, not in Dynamo
    default_calibration = opts.calibration is None
    if default_calibration:
        opts = dataclasses.replace(opts, calibration=[kwargs if kwargs else args])
    backend = _Backend(opts, pipeline, default_calibration)
    torch._dynamo.reset()
    try:
        with _private_stats_cache(), torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    except Exception:
        if backend.error is not None:
            raise backend.error from None
        raise
    finally:
        torch._dynamo.reset()
    if not backend.graphs:
        raise RuntimeError(f"explain(): Dynamo captured no graph from {type(model).__name__} on these inputs "
                           "(nothing to quantize)")
    return ExplainReport(str(pipeline), backend.graphs)


# --- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> ExplainReport:
    from qcompile.tools import zoo
    from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES

    parser = argparse.ArgumentParser(
        prog="qcompile explain",
        description="What q4 does to a shipped model, linear by linear: how each runs (or why it stays in "
                    "float), its input's outlier ratio before and after migration/rotation, and its local "
                    "quantization SQNR on Emma tokens; the passes with times and statistics; the pipeline "
                    "that reproduces it. Nothing is lowered or compiled.")
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "minilm"),
                        help="shipped model: SmolLM2-135M (default) or all-MiniLM-L6-v2")
    parser.add_argument("--recipe", default=None,
                        help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE}, or Q4_RECIPE)")
    parser.add_argument("--pipeline", default=None, help="a pipeline string replacing the recipe's")
    parser.add_argument("--tokens", type=int, default=256,
                        help="calibration tokens of Emma (default 256); the first window is the example input")
    parser.add_argument("--window", type=int, default=128, help="tokens per calibration window (default 128)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    if args.recipe is not None and args.recipe not in RECIPES:
        parser.error(f"unknown recipe {args.recipe!r}; known recipes: {', '.join(RECIPES)}")
    if args.tokens < 1 or args.window < 1:
        parser.error("--tokens and --window must be >= 1")
    options: dict[str, Any] = {}
    if args.recipe is not None:
        options["recipe"] = args.recipe
    if args.pipeline is not None:
        options["pipeline"] = args.pipeline

    if args.model == "smollm2":
        model, tokenizer = zoo.load_smollm2()
        extra = {"use_cache": False}  # no KV cache output: v_proj rows can take o_proj's migration
    else:
        model, tokenizer = zoo.load_minilm()
        extra = {}
    windows = zoo.token_windows(tokenizer, "emma", args.tokens, args.window)
    calibration = [{"input_ids": ids, **extra} for ids in windows]
    report = explain(model, calibration[0], calibration=calibration, **options)
    print(report)
    if args.json:
        text = json.dumps(report.to_dict(), indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
