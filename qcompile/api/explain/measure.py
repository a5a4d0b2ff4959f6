"""explain's measurement: each linear's float weight just before quantization (`Recorder`, an
instrument of the pass manager), and one run of the final graph that measures every linear's
input outliers and local SQNR (`linear_rows`).

How each linear runs comes from the IR itself: its form from the recognizer
(`qcompile.core.qlinear`), the insert-quantizers run that took it from the record that pass
leaves on it (`ir.QUANTIZED`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from qcompile.algorithms.metrics import sqnr_db
from qcompile.api.explain.report import LinearRow
from qcompile.core import ir, qlinear, weights
from qcompile.core.instrument import Instrument
from qcompile.core.pass_api import PassResult, QPass

__all__ = ["Recorder", "linear_rows"]

_INSERT = "insert-quantizers"


@dataclasses.dataclass
class _Reference:
    """A linear as it was just before the first insert-quantizers pass."""

    module: str
    weight: torch.Tensor | None  # None: not a constant
    bias: torch.Tensor | None
    bias_is_constant: bool


class Recorder(Instrument):
    """Snapshots each linear's float weight before the first insert-quantizers pass, then follows
    every linear through later passes by `q4_provenance` (node name -> its original name)."""

    def __init__(self) -> None:
        self.references: dict[str, _Reference] | None = None  # by original node name
        self.origin: dict[str, str] = {}  # node name -> original node name

    def before_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> None:
        if qpass.name != _INSERT or self.references is not None:
            return
        self.references = {}
        for node in gm.graph.nodes:
            q = qlinear.match(node)
            if q is None or q.form != qlinear.FLOAT:
                continue
            bias_value = ir.get_constant(gm, q.bias) if isinstance(q.bias, fx.Node) else None
            self.references[node.name] = _Reference(
                ir.module_path(node), weights.value(gm, q.weight), bias_value,
                q.bias is None or bias_value is not None)
            self.origin[node.name] = node.name

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        if self.references is None:
            return
        for node in gm.graph.nodes:
            if node.name in self.origin or not qlinear.is_linear(node):
                continue
            sources = node.meta.get(ir.PROVENANCE, {}).get("from", [])
            found = next((self.origin[s] for s in sources if s in self.origin), None)
            if found is not None:
                self.origin[node.name] = found


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
        q = qlinear.match(node)
        g = qlinear.match_grouped(node) if q is None else None
        if g is not None and g.quantized:  # a mixture of experts' grouped GEMM, quantized (no SQNR probe)
            record = node.meta.get(ir.QUANTIZED)
            w_bits = record.w_bits if record is not None else 4
            a_bits = g.a_bits if g.a_bits is not None else 16  # weight-only: float activations
            kind = "fused" if g.fused else "fake-quant" if a_bits != 16 else "weight-only"
            group = f" g{record.w_group}" if record is not None and record.w_group and g.w_mult is not None else ""
            described.append((node, dict(graph=graph, module=qlinear.grouped_name(node),
                                         runs_as=f"W{w_bits}A{a_bits} experts {kind}{group}", w_bits=w_bits,
                                         a_bits=a_bits, float_reason="", migration="not migrated", rotation="-",
                                         split=0, first_token=node.meta.get(ir.SINKS, "-").removeprefix("first token "),
                                         outliers_before=None, node=node.name)))
            continue
        if q is None:
            if ir.FLOAT_REASON in node.meta:  # another op reading a weight (a grouped expert GEMM)
                described.append((node, dict(graph=graph, module=qlinear.grouped_name(node), runs_as="float",
                                             w_bits=None, a_bits=None, float_reason=node.meta[ir.FLOAT_REASON],
                                             migration="-", rotation="-", split=0, first_token="-",
                                             outliers_before=None, node=node.name)))
            continue
        module = ir.module_path(node) or node.name
        original = recorder.origin.get(node.name)
        if original is None and len(by_module.get(module, ())) == 1:
            original = by_module[module][0]  # provenance lost: the module path is unambiguous
        reference = refs.get(original) if original is not None else None
        record = node.meta.get(ir.QUANTIZED)  # the insert-quantizers run that took it, if any
        w_bits = record.w_bits if record is not None else None
        reason = ""
        if q.quantized:
            a_bits = q.a_bits if q.a_bits is not None else 16
            kind = ("fused" if q.fused else "fake-quant" if a_bits != 16 else "weight-only") + \
                (" dynamic" if q.dynamic else "")  # a step per token at run time
            runs_as = f"W{w_bits if w_bits is not None else '?'}A{a_bits} {kind}"
            if q.float_formats:  # LLM-FP4
                runs_as = f"FP4 {q.float_formats} {kind}"
            if record is not None and record.w_group and q.w_mult is not None:
                runs_as += f" g{record.w_group}"
            w_bits = w_bits if w_bits is not None else 4  # packed int4 storage
        elif record is not None and not record.rounded and reference is not None and reference.weight is not None:
            a_bits = record.a_bits
            runs_as = f"W{w_bits}A{a_bits} not rounded"
        else:
            runs_as, w_bits, a_bits = "float", None, None
            reason = _float_reason(node, recorder)
        measured = reference if w_bits is not None else None
        probes[node] = _Probe(node, q.x, measured, q.bias)
        migration = node.meta.get(ir.MIGRATION, {}).get("status", "-")
        outliers = node.meta.get(ir.OUTLIERS)
        described.append((node, dict(graph=graph, module=module, runs_as=runs_as, w_bits=w_bits, a_bits=a_bits,
                                     float_reason=reason, migration=migration,
                                     rotation=node.meta.get(ir.ROTATION, "-"), split=node.meta.get(ir.SPLIT, 0),
                                     first_token=node.meta.get(ir.SINKS, "-").removeprefix("first token "),
                                     outliers_before=None if outliers is None else outliers.max_ratio,
                                     node=node.name)))
    if probes:
        with torch.no_grad():
            _Measure(final_gm, probes).run(*inputs)
    return [LinearRow(**fields, outliers_after=probes[node].ratio if node in probes else None,
                      sqnr_db=probes[node].sqnr if node in probes else None)
            for node, fields in described]
