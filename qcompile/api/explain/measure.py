"""explain's measurement: which linears each insert-quantizers run took, their float weights just
before quantization (`Recorder`, an instrument of the pass manager), and one run of the final
graph that measures every linear's input outliers and local SQNR (`linear_rows`).

What a quantized linear looks like (`_probe_input`, `_weight_dequantize`) is read here only; these
follow the forms insert-quantizers and fuse-kernels make.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.q4)
from qcompile.algorithms.metrics import sqnr_db
from qcompile.api.explain.report import LinearRow
from qcompile.core import ir
from qcompile.core.instrument import Instrument
from qcompile.core.pass_api import PassResult, QPass

__all__ = ["Recorder", "linear_rows"]

q4 = torch.ops.q4
_INSERT = "insert-quantizers"


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is ir.aten.linear.default or node.target is q4.linear_w4a4.default)


@dataclasses.dataclass
class _Reference:
    """A linear as it was just before the first insert-quantizers pass."""

    module: str
    weight: torch.Tensor | None  # None: not a constant
    bias: torch.Tensor | None
    bias_is_constant: bool


class Recorder(Instrument):
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
    return w if isinstance(w, fx.Node) and w.target is q4.dequantize_weight_int4.default else None


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
                probe.sqnr = sqnr_db(y_ref, out)
        return out


def _outlier_ratio(x: torch.Tensor) -> float | None:
    if x.numel() == 0:
        return None
    absmax = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    median = absmax.median().item()
    return absmax.max().item() / median if median > 0 else None


def _probe_input(node: fx.Node) -> tuple[fx.Node, int | None, Any]:
    """(the float activation entering the quantizer, activation bits or None, bias argument)."""
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


def _float_reason(node: fx.Node, recorder: Recorder) -> str:
    reason = node.meta.get(ir.FLOAT_REASON)
    if reason:
        return reason
    if recorder.references is None:
        return "no insert-quantizers pass in the pipeline"
    return "no insert-quantizers run took it (see their only=/skip=)"


def linear_rows(final_gm: fx.GraphModule, inputs: list[Any], recorder: Recorder, graph: int) -> list[LinearRow]:
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
