"""fuse-kernels: a fake-quantized linear becomes one integer kernel, `q4.linear_w4a4`.

Matches the form `insert-quantizers` leaves (int4 activation codes dequantized per tensor, int4
weights dequantized per output channel, a float linear) and replaces it with the fused op, which
multiplies the integer codes with int32 accumulation and applies one epilogue:
`acc * (a_step * w_step) + bias`.

Before:
    x_q = q4.quantize_per_tensor(x, a_step, 4)
    x_dq = q4.dequantize_per_tensor(x_q, a_step, f32)
    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32)
    linear = aten.linear(x_dq, w_dq, b)

After:
    x_q = q4.quantize_per_tensor(x, a_step, 4)
    linear = q4.linear_w4a4(x_q, w_packed, w_step, a_step, b, f32)

The kernel multiplies any int8 activation codes exactly, so W4A8 linears (8-bit codes) fuse
the same way. Weight-only linears (float activations) stay in their fake-quantized form and are
counted in `linears-not-fused`.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.core import ir
from qcompile.kernels import ops as _ops  # noqa: F401  (registers torch.ops.q4)
from qcompile.core.pass_api import PassResult, QPass, register_pass

q4 = torch.ops.q4


def _match(node: fx.Node) -> dict | None:
    """The parts of a fake-quantized int4 linear rooted at `node`, or None."""
    if node.op != "call_function" or node.target is not ir.aten.linear.default:
        return None
    x_dq, w_dq = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(x_dq, fx.Node) and x_dq.target is q4.dequantize_per_tensor.default):
        return None
    if not (isinstance(w_dq, fx.Node) and w_dq.target is q4.dequantize_weight_int4.default):
        return None
    x_q, a_step, dtype = x_dq.args
    if not (isinstance(x_q, fx.Node) and x_q.target is q4.quantize_per_tensor.default):
        return None
    packed, w_step, _k, _w_dtype = w_dq.args
    return dict(x_q=x_q, a_step=a_step, a_bits=x_q.args[2], packed=packed, w_step=w_step,
                bias=bias, dtype=dtype, x_dq=x_dq, w_dq=w_dq)


def _reads_packed_weight(node: fx.Node) -> bool:
    w = node.args[1] if node.op == "call_function" and node.target is ir.aten.linear.default else None
    return isinstance(w, fx.Node) and w.target is q4.dequantize_weight_int4.default


@register_pass
class FuseKernels(QPass):
    name = "fuse-kernels"
    summary = "Replace quantize -> linear -> dequantize with the fused integer kernel q4.linear_w4a4."
    statistics = ("linears-fused", "linears-not-fused")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for node in self.nodes(gm):
            parts = _match(node)
            if parts is None:
                if _reads_packed_weight(node):  # weight-only (float activations): no kernel yet
                    self.count("linears-not-fused")
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(
                    q4.linear_w4a4.default,
                    (parts["x_q"], parts["packed"], parts["w_step"], parts["a_step"], parts["bias"], parts["dtype"]),
                )
            ir.mark_created(fused, self.name, [node, parts["x_dq"], parts["w_dq"]])
            fused.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            for dead in (parts["x_dq"], parts["w_dq"]):
                if not dead.users:
                    graph.erase_node(dead)
            self.count("linears-fused")
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
