"""fuse-kernels: a fake-quantized linear becomes one integer kernel, `q4.linear_w4a4`; a weight-only
linear becomes `q4.linear_w4a16`.

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
the same way, and so do FP4 linears (LLM-FP4's 4-bit floats are small integers, see
qcompile/kernels/formats.py): the weight's format becomes the kernel's `w_format` argument, the
activation's stays on its quantize:

    x_q = q4.quantize_per_tensor(x, a_step, 4, "e3m0")
    linear = q4.linear_w4a4(x_q, w_packed, w_step, a_step, b, f32, "e2m1")

A weight with group multipliers (`insert-quantizers{w-group=32}`: each group of 32 k an integer
multiple of the row's step, formats.py) keeps them as the kernel's `w_mult` argument:

    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32, w_mult=w_mult)
    linear = q4.linear_w4a4(x_q, w_packed, w_step, a_step, b, f32, w_mult=w_mult)

Weight-only linears (float activations, `insert-quantizers{a-bits=16}`) fuse into the
weight-only kernel, which reads the packed weight (on CPU at decode: directly, no dequantized
copy of the weight; see qcompile/kernels/cpu_kernels.py):

Before:
    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32)
    linear = aten.linear(x, w_dq, b)

After:
    linear = q4.linear_w4a16(x, w_packed, w_step, b, f32)

A mixture of experts' grouped GEMM in its fake-quant form (`qcompile.core.qlinear.match_grouped`:
transformers' grouped_mm_fallback or aten._grouped_mm on the experts' stacked dequantized
weight) becomes the grouped integer kernel, each expert's rows a linear_w4a4 of their own:

Before:
    x_q = q4.quantize_per_tensor(x, a_step, 4)
    x_dq = q4.dequantize_per_tensor(x_q, a_step, f32)
    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32)     # w_packed: u8[E * N, K/2]
    out = transformers.grouped_mm_fallback(x_dq, aten.transpose(aten.view(w_dq, [E, N, K]), -2, -1), offs)

After:
    x_q = q4.quantize_per_tensor(x, a_step, 4)
    out = q4.grouped_linear_w4a4(x_q, w_packed, w_step, a_step, offs, f32)

A fake-quantized linear whose codes do not come from a q4.quantize_per_tensor, and a weight-only
linear with a 4-bit float weight (the weight-only kernel reads int4), are left as they are and
counted in `linears-not-fused`.

Declared invariant, checked from this pass on: `fake-quant-linears-are-fused` (no fake-quantized
linear whose codes come from a q4.quantize_per_tensor is left; insert-quantizers, which makes
them, must run before this pass).
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.core import ir, qlinear
from qcompile.core.pass_api import PassResult, QPass, register_pass
from qcompile.kernels import formats

q4 = torch.ops.q4


def fake_quant_linears_are_fused(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Once fuse-kernels has run, every fake-quantized linear it could fuse is fused."""
    q = qlinear.match(node) or qlinear.match_grouped(node)
    if q is not None and q.form == qlinear.FAKE_QUANT and q.quant is not None:
        return f"a fake-quantized W4A{q.a_bits} linear is left unfused (made after fuse-kernels ran?)"
    return None


@register_pass
class FuseKernels(QPass):
    name = "fuse-kernels"
    summary = ("Replace quantize -> linear -> dequantize with the fused integer kernel q4.linear_w4a4, "
               "a weight-only linear with q4.linear_w4a16.")
    statistics = ("linears-fused", "linears-not-fused")
    after = {"insert-quantizers": "it fuses the fake-quantized linears insert-quantizers leaves; "
                                  "run before them it finds nothing to fuse"}
    invariants = (fake_quant_linears_are_fused,)

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for node in self.nodes(gm):
            if self._fuse_grouped(gm, node):
                modified = True
                continue
            q = qlinear.match(node)
            if q is None or q.form not in (qlinear.FAKE_QUANT, qlinear.WEIGHT_ONLY) or q.w_dq is None:
                continue  # not a quantized linear, or already the fused weight-only op
            if q.form == qlinear.WEIGHT_ONLY and q.w_format == formats.INT:
                dtype = q.w_dq.args[3]  # the weight's dtype, which aten.linear gives its output
                target, args, sources = q4.linear_w4a16.default, (q.x, q.packed, q.w_step, q.bias, dtype), [node, q.w_dq]
            elif q.form == qlinear.WEIGHT_ONLY or q.quant is None:
                # a 4-bit float weight-only linear (the weight-only kernel reads int4), or codes from
                # elsewhere (no activation step to fuse with)
                self.count("linears-not-fused")
                continue
            else:
                dtype = q.x_dq.args[2]
                format_arg = () if q.w_format == formats.INT else (q.w_format,)
                target = q4.linear_w4a4.default
                args = (q.quant, q.packed, q.w_step, q.a_step, q.bias, dtype, *format_arg)
                sources = [node, q.x_dq, q.w_dq]
            kwargs = {} if q.w_mult is None else {"w_mult": q.w_mult}
            with graph.inserting_before(node):
                fused = graph.call_function(target, args, kwargs)
            ir.mark_created(fused, self.name, sources)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            for dead in sources[1:]:
                if not dead.users:
                    graph.erase_node(dead)
            self.count("linears-fused")
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def _fuse_grouped(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """A fake-quantized grouped expert GEMM becomes q4.grouped_linear_w4a4; whether it did."""
        g = qlinear.match_grouped(node)
        if g is None or g.form != qlinear.FAKE_QUANT:
            return False
        if g.quant is None:  # codes from elsewhere: no activation step to fuse with
            self.count("linears-not-fused")
            return False
        graph = gm.graph
        dtype = g.x_dq.args[2]
        format_arg = () if g.w_format == formats.INT else (g.w_format,)
        kwargs = {} if g.w_mult is None else {"w_mult": g.w_mult}
        with graph.inserting_before(node):
            fused = graph.call_function(q4.grouped_linear_w4a4.default,
                                        (g.quant, g.packed, g.w_step, g.a_step, g.offs, dtype, *format_arg), kwargs)
        transpose = node.args[1]
        view = transpose.args[0]
        ir.mark_created(fused, self.name, [node, g.x_dq, g.w_dq])
        fused.meta[qlinear.EXPERT_WEIGHT] = node.meta.get(qlinear.EXPERT_WEIGHT)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        for dead in (g.x_dq, transpose, view, g.w_dq):
            if not dead.users:
                graph.erase_node(dead)
        self.count("linears-fused")
        return True
