"""The run-time range check: warn once when a call's activations go far beyond what calibration saw.

A static activation step was chosen on the calibration batches. A call whose activations are
many times larger (text of another kind, an input scaled by mistake, an fp16 overflow upstream)
is clipped to the largest code: the model still computes what the quantized model computes for
it, the same values as without the check, but that can be far from the float model. Nothing
else would tell the user, so the lowered graph computes, beside its outputs, the largest |x| at
each static quantizer's input divided by the largest calibration saw there (one reduction per
quantizer, which Inductor fuses with the loop that quantizes), and the first call where one goes
past `FAR_OUTSIDE` warns, naming the linears:

    graph (final)                         lowered graph (range_check.monitored)
    x_q = q4.quantize_per_tensor(x, s, 4)  x_q = q4.quantize_per_tensor(x, s, 4)
    ...                                    r = new_empty(x, [sites], dtype=float32)   (at the first)
    return (y,)                            lo, hi = aminmax(x)
                                           copy_(r[0], max(-lo, hi) / 3.71)  (x is freed after)
                                           ...
                                           return (y, r)

`CompiledGraph` strips the last output and hands it to `RangeMonitor.check`. On a GPU the ratios
are copied to host memory without waiting (right after the call: under CUDA graphs the next
replay overwrites its outputs) and checked at a later call once the copy has landed: reading
them at once, or at the next call, would make every call wait for the GPU. Dynamic
activations (steps per token at run time) have nothing to check. Off with the option
`range_warning=False` (`Q4_RANGE_WARNING=0`).
"""

from __future__ import annotations

import copy
import operator
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from qcompile.core import ir

# How far beyond the calibrated max |x| a call must go to warn. Rotated statistics come from a
# sample of the calibration tokens, so the range they give can fall a little short of the true
# one; normal text stays well within 2x of it on SmolLM2.
FAR_OUTSIDE = 4.0

aten = torch.ops.aten


class RangeMonitor:
    """The sites a lowered graph checks (in the order of its extra output) and the warning."""

    def __init__(self, graph_id: str, sites: list[str]):
        self.graph_id, self.sites = graph_id, sites
        self._warned = False
        # on a GPU: a host copy of one call's ratios in flight, and whether it has landed
        self._pending: tuple[torch.Tensor, Callable[[], bool]] | None = None
        self._host: torch.Tensor | None = None
        self._lock = threading.Lock()

    def split(self, outputs: Any) -> Any:
        """The graph's own outputs, checking (on a GPU: copying, to check later) the ratios appended to them."""
        ratios, outputs = outputs[-1], outputs[:-1]
        if self._warned:
            return outputs
        if ratios.device.type == "cpu":
            self.check(ratios)
            return outputs
        with self._lock:
            landed = None
            if self._pending is not None and self._pending[1]():
                landed, self._pending = self._pending[0].clone(), None
            if self._pending is None:  # one copy in flight at a time: calls while it is are not checked
                self._pending = self._copy_to_host(ratios.detach())
        if landed is not None:
            self.check(landed)
        return outputs

    def _copy_to_host(self, ratios: torch.Tensor) -> tuple[torch.Tensor, Callable[[], bool]]:
        """Start copying `ratios` to (pinned, reused) host memory; the copy, and whether it has landed."""
        if self._host is None or self._host.shape != ratios.shape:
            self._host = torch.empty(ratios.shape, dtype=ratios.dtype, pin_memory=True)
        self._host.copy_(ratios, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return self._host, event.query

    def check(self, ratios: torch.Tensor) -> None:
        """Warn (once) when a site's max |x| went past FAR_OUTSIDE times its calibrated range."""
        ratios = ratios.float().cpu()
        far = (ratios > FAR_OUTSIDE) | ratios.isnan()
        if not bool(far.any()):
            return
        with self._lock:
            if self._warned:
                return
            self._warned = True
        worst = sorted(far.nonzero().flatten().tolist(), key=lambda i: -float(ratios[i].nan_to_num(float("inf"))))
        listed = ", ".join(f"{self.sites[i]} ({_times(float(ratios[i]))})" for i in worst[:3])
        more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
        warnings.warn(
            f"qcompile: a call to graph {self.graph_id} went far outside the activation range calibrated for "
            f"{len(worst)} quantized linear input(s): {listed}{more} (max |x| over the calibrated max). Static "
            "steps clip such values to the largest 4-bit code, so this output may be far from the float model's. "
            "Calibrate on data like this call's, or use a recipe with dynamic activations (w4a4-dynamic). "
            "Said once per graph; range_warning=False turns the check off.", stacklevel=3)


def _times(ratio: float) -> str:
    return "non-finite" if ratio != ratio or ratio == float("inf") else f"{ratio:.1f}x"


def monitored(gm: fx.GraphModule, graph_id: str) -> tuple[fx.GraphModule, RangeMonitor | None]:
    """A graph module like `gm` (sharing its constants) that also returns each static
    quantizer's max |x| / calibrated range as a last output (float32 [sites]), and its
    monitor; `gm` itself and None when it has no static quantizer to check."""
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(ir.CALIBRATED_RANGE, 0) > 0]
    if not sites or not isinstance(gm.graph.output_node().args[0], (tuple, list)):
        return gm, None
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    output = graph.output_node()
    ratios = None
    for i, site in enumerate(sites):
        x = by_name[site.args[0].name]
        # Right after the quantizer, not before the output: run eagerly, a check at the end kept
        # every checked activation alive to the end of the graph (SmolLM2, 512 tokens: +470 MiB
        # at the call, against +123 for the float model's forward). Each ratio goes into one
        # tensor made at the first site, not a small tensor per site kept to a `stack` at the
        # end: run eagerly, each kept one sat in the hole its site's temporaries left, and the
        # next site's, as large, did not fit there (+352 MiB at that call, +194 without the check).
        with graph.inserting_before(by_name[site.name].next):
            if ratios is None:
                ratios = graph.call_function(aten.new_empty.default, (x, [len(sites)]), {"dtype": torch.float32})
            # max |x| as max(-min, max): no |x| copy of the activation; NaN propagates through both
            both = graph.call_function(aten.aminmax.default, (x,))
            low, high = (graph.call_function(operator.getitem, (both, j)) for j in (0, 1))
            peak = graph.call_function(aten.maximum.default, (graph.call_function(aten.neg.default, (low,)), high))
            peak = graph.call_function(aten._to_copy.default, (peak,), {"dtype": torch.float32})
            ratio = graph.call_function(aten.div.Scalar, (peak, site.meta[ir.CALIBRATED_RANGE]))
            graph.call_function(aten.copy_.default, (graph.call_function(aten.select.int, (ratios, 0, i)), ratio))
    (outputs,) = output.args
    output.args = ((*outputs, ratios),)
    names = [ir.module_path(site) or site.name for site in sites]
    return fx.GraphModule(gm, graph), RangeMonitor(graph_id, names)
