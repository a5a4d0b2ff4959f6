"""The one recognizer of linears in the IR: which form a linear has and what it is made of.

Every pass, the printer and the reports ask `match(node)` instead of looking at op names, so a
new quantized form is added here once. The forms (`QLinear.form`):

    float        aten.linear(x, w, b)                                  w: a float tensor
    fake-quant   aten.linear(q4.dequantize_per_tensor(q4.quantize_per_tensor(x, a_step, bits),
                             a_step, dtype), q4.dequantize_weight_int4(packed, w_step, K, dtype), b)
                 as insert-quantizers leaves it (W4A4, W4A8, ...)
    weight-only  aten.linear(x, q4.dequantize_weight_int4(packed, w_step, K, dtype), b)   (W4A16)
                 or, fused by fuse-kernels, q4.linear_w4a16(x, packed, w_step, b, dtype): the same
                 form in one op (w_dq and k None; `fused` stays False: it reads float activations)
    fused        q4.linear_w4a4(x_codes, packed, w_step, a_step, b, dtype), or its Triton twin
                 q4.linear_w4a4_triton: the integer kernel, on int4 or int8 codes (W4A4 / W4A8)

Codes have a number format (`qcompile/kernels/formats.py`): `int`, or one of LLM-FP4's 4-bit floats
(`e2m1`, `e3m0`, `e1m2`), given by the ops' optional format arguments (absent: int). An FP4 linear
has the same forms and ops as an integer one; `q.w_format` and `q.a_format` say which it is.
A weight with group multipliers (formats.py) has them as the ops' optional `w_mult` argument:
`q.w_mult` (None: one step per output channel).

    q = match(node)
    if q is not None and q.quantized:
        q.x, q.a_bits, q.bias          # the float activation entering the quantizer, its bits
        q.packed, q.w_step             # the weight's nodes
    q.w_format, q.a_format         # "int", "e2m1", ... (a_format None when activations are float)
    q.w_mult                       # the group multipliers' node, or None

Also here: `constant_weight` (a float linear reading a constant 2-D float weight: what the
passes rewrite) and `CASTS` (ops that only change the dtype of their first argument).

A mixture of experts' grouped GEMM (transformers' `grouped_mm_experts_forward`: the rows of x
sorted by expert, `offs` the experts' cumulative row counts) has forms of its own, which
`match_grouped(node)` recognizes (`GroupedLinear`; `match` does not: no pass but
insert-quantizers and fuse-kernels handles them):

    float        G(x, aten.transpose(W, -2, -1), offs)        W: a constant [E, N, K]
                 G = transformers.grouped_mm_fallback (fp32/fp16 under compile) or aten._grouped_mm
    fake-quant   G(q4.dequantize_per_tensor(q4.quantize_per_tensor(x, a_step, bits), a_step, dtype),
                   aten.transpose(aten.view(q4.dequantize_weight_int4(packed, w_step, K, dtype), [E, N, K]),
                                  -2, -1), offs)
                 packed [E * N, ceil(K/2)], w_step [E * N]: the experts' rows stacked, each expert
                 per output row (as insert-quantizers leaves it)
    weight-only  G(x, the same dequantized weight, offs)   (a-bits=16: float activations; not fused)
    fused        q4.grouped_linear_w4a4(x_codes, packed, w_step, a_step, offs, dtype)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from qcompile.core import ir, weights
from qcompile.kernels import ops as _ops  # noqa: F401  (registers torch.ops.q4)
from qcompile.kernels.formats import INT

__all__ = ["QLinear", "match", "constant_weight", "is_linear", "CASTS", "GroupedLinear", "match_grouped",
           "is_grouped_mm", "constant_expert_weight",
           "FLOAT", "FAKE_QUANT", "WEIGHT_ONLY", "FUSED", "FUSED_OPS", "WEIGHT_ONLY_OPS"]

q4 = torch.ops.q4
aten = torch.ops.aten

FLOAT, FAKE_QUANT, WEIGHT_ONLY, FUSED = "float", "fake-quant", "weight-only", "fused"
# The integer kernel and its Triton twin (the lowering swaps one for the other): same arguments.
FUSED_OPS = (q4.linear_w4a4.default, q4.linear_w4a4_triton.default)
# The fused weight-only linear (float activations): a WEIGHT_ONLY form with no w_dq node.
WEIGHT_ONLY_OPS = (q4.linear_w4a16.default,)
# Ops that only change the dtype of their first argument: a per-channel scale passes through them.
CASTS = (aten.to.dtype, aten.type_as.default, aten._to_copy.default)


class _Form:
    """What a matched op's `form` says of it (QLinear and GroupedLinear)."""

    form: str

    @property
    def quantized(self) -> bool:
        """Whether the weight is rounded (stored packed): every form but FLOAT."""
        return self.form != FLOAT

    @property
    def fused(self) -> bool:
        return self.form == FUSED


@dataclasses.dataclass(frozen=True)
class QLinear(_Form):
    """A linear of the IR and the nodes it is made of.

    node     the linear itself (aten.linear or the fused op)
    form     FLOAT, FAKE_QUANT, WEIGHT_ONLY or FUSED
    input    what the linear node reads as its activation argument: float x, dequantized codes
             (fake-quant) or the codes (fused)
    x        the float activation entering the quantizer; `input` when no q4.quantize_per_tensor
             made the codes (float, weight-only, or codes from elsewhere)
    a_bits   bits of the activation codes; None when activations are float (float, weight-only)
             or when the codes' quantize is unknown (`quant` is None)
    quant    the q4.quantize_per_tensor making the codes, or None
    x_dq     the q4.dequantize_per_tensor of a fake-quant linear, or None
    w_dq     the q4.dequantize_weight_int4 of a fake-quant or weight-only linear, or None
    weight   the float weight argument (FLOAT), else None
    packed, w_step, a_step, k   the quantized weight's nodes, the activation step, the input width
             K where the IR states it (None where it does not: the fused op, float)
    bias     the bias argument, read one way for every form (None: no bias)
    w_format, a_format   number formats of the weight and activation codes (`kernels.formats`);
             None where there are none (a float weight; float activations or unknown codes)
    w_mult   the weight's group multipliers (uint8 [N, K / group]), or None: a step per channel
    """

    node: fx.Node
    form: str
    input: Any
    x: Any
    a_bits: int | None = None
    quant: fx.Node | None = None
    x_dq: fx.Node | None = None
    w_dq: fx.Node | None = None
    weight: Any = None
    packed: Any = None
    w_step: Any = None
    a_step: Any = None
    k: Any = None
    bias: Any = None
    w_format: str | None = None
    a_format: str | None = None
    w_mult: Any = None

    @property
    def float_formats(self) -> str | None:
        """`e2m1/e3m0`: the weight / activation formats when either is a 4-bit float (LLM-FP4),
        an integer side named by its bits (`int4`, `int8`); None for an integer linear."""
        if self.w_format in (INT, None) and self.a_format in (INT, None):
            return None
        a_format = f"int{self.a_bits}" if self.a_format == INT else self.a_format or "float"
        return f"{'int4' if self.w_format == INT else self.w_format}/{a_format}"

    @property
    def dynamic(self) -> bool:
        """Whether the activation step is computed per row at run time (`q4.token_steps`)."""
        return _is(self.a_step, q4.token_steps.default)

    @property
    def sink_bits(self) -> int | None:
        """Bits of the first token's codes when the quantize steps it apart (`sinks`), else None."""
        if self.quant is None or _arg(self.quant, 4, "sinks") is None:
            return None
        return _arg(self.quant, 5, "sink_bits") or 8

    @property
    def sink_steps(self) -> tuple[Any, Any] | None:
        """(the first token's step, the others' step) when the activation step is
        `where(sinks, sink_step, step)` (insert-quantizers{sinks=true}), else None."""
        if _is(self.a_step, aten.where.self):
            return self.a_step.args[1], self.a_step.args[2]
        return None


def _is(node: Any, op: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


def _arg(node: fx.Node, index: int, name: str) -> Any:
    """Argument `index` of `node`, positional or by keyword `name`; None when absent."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _codes(codes: Any) -> tuple[Any, int | None, fx.Node | None, str | None]:
    """(float activation, bits, quantize node, format) behind activation codes."""
    if _is(codes, q4.quantize_per_tensor.default):
        return codes.args[0], codes.args[2], codes, _arg(codes, 3, "format") or INT
    return codes, None, None, None


def match(node: Any) -> QLinear | None:
    """The QLinear rooted at `node` (a linear in any form), or None for any other node."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in FUSED_OPS:
        codes, packed, w_step, a_step = node.args[:4]
        x, bits, quant, a_format = _codes(codes)
        return QLinear(node, FUSED, codes, x, bits, quant, packed=packed, w_step=w_step, a_step=a_step,
                       bias=_arg(node, 4, "bias"), w_format=_arg(node, 6, "w_format") or INT, a_format=a_format,
                       w_mult=_arg(node, 7, "w_mult"))
    if node.target in WEIGHT_ONLY_OPS:
        x, packed, w_step = node.args[:3]
        return QLinear(node, WEIGHT_ONLY, x, x, packed=packed, w_step=w_step, bias=_arg(node, 3, "bias"),
                       w_format=INT, w_mult=_arg(node, 5, "w_mult"))
    if node.target is not aten.linear.default:
        return None
    x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    if not _is(weight, q4.dequantize_weight_int4.default):
        return QLinear(node, FLOAT, x, x, weight=weight, bias=bias)
    packed, w_step, k = weight.args[:3]
    w_format = _arg(weight, 4, "format") or INT
    w_mult = _arg(weight, 5, "w_mult")
    if _is(x, q4.dequantize_per_tensor.default):
        codes, a_step = x.args[0], x.args[1]
        source, bits, quant, a_format = _codes(codes)
        return QLinear(node, FAKE_QUANT, x, source if quant is not None else x, bits, quant, x_dq=x, w_dq=weight,
                       packed=packed, w_step=w_step, a_step=a_step, k=k, bias=bias, w_format=w_format,
                       a_format=a_format, w_mult=w_mult)
    return QLinear(node, WEIGHT_ONLY, x, x, w_dq=weight, packed=packed, w_step=w_step, k=k, bias=bias,
                   w_format=w_format, w_mult=w_mult)


def is_linear(node: Any) -> bool:
    """Whether `node` is a linear in any form (float, fake-quant, weight-only, fused)."""
    return match(node) is not None


def weight_shape(gm: fx.GraphModule, node: Any) -> torch.Size | None:
    """The shape of `node`'s weight when it is a float `aten.linear` reading a constant 2-D float
    weight or a weight expression of one (core/weights.py; what insert-quantizers, migrate-scales,
    fold-scales and rotate-inputs rewrite), read without computing it; else None."""
    q = match(node)
    found = weights.shape_and_dtype(gm, q.weight) if q is not None and q.form == FLOAT else None
    if found is None or len(found[0]) != 2 or not found[1].is_floating_point:
        return None
    return found[0]


def constant_weight(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The weight of `node` when `weight_shape` has one: the constant, or its expression computed
    now (a new tensor: hold it no longer than needed); else None."""
    return weights.value(gm, match(node).weight) if weight_shape(gm, node) is not None else None


# --- a mixture of experts' grouped GEMM ------------------------------------------------------------

GROUPED_FUSED_OPS = (q4.grouped_linear_w4a4.default,)


def is_grouped_mm(target: Any) -> bool:
    """aten._grouped_mm, or transformers' opaque fallback for it (registered when transformers'
    MoE integration is imported; matched by name so this module never imports transformers)."""
    return target is aten._grouped_mm.default or str(target) == "transformers.grouped_mm_fallback.default"


@dataclasses.dataclass(frozen=True)
class GroupedLinear(_Form):
    """A grouped expert GEMM of the IR (see the module doc) and the nodes it is made of.

    node     the grouped op (G or q4.grouped_linear_w4a4)
    form     FLOAT, FAKE_QUANT, WEIGHT_ONLY or FUSED
    x        the float activation [S, K] (entering the quantizer, when there is one)
    offs     the experts' cumulative row counts [E]
    weight   FLOAT: the constant node of W [E, N, K] (`transposed`: G reads it transposed; else
             W is stored [E, K, N] and G reads it as it is)
    quant, x_dq, w_dq, packed, w_step, a_step, w_mult, a_bits, w_format, a_format: as QLinear's
    """

    node: fx.Node
    form: str
    x: Any
    offs: Any
    weight: Any = None
    transposed: bool = True
    a_bits: int | None = None
    quant: fx.Node | None = None
    x_dq: fx.Node | None = None
    w_dq: fx.Node | None = None
    packed: Any = None
    w_step: Any = None
    a_step: Any = None
    w_format: str | None = None
    a_format: str | None = None
    w_mult: Any = None


def match_grouped(node: Any) -> GroupedLinear | None:
    """The GroupedLinear rooted at `node`, or None (also for a grouped GEMM with a bias or an
    out_dtype of aten._grouped_mm's own, which no form holds)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in GROUPED_FUSED_OPS:
        codes, packed, w_step, a_step, offs = node.args[:5]
        x, bits, quant, a_format = _codes(codes)
        return GroupedLinear(node, FUSED, x, offs, a_bits=bits, quant=quant, packed=packed, w_step=w_step,
                             a_step=a_step, w_format=_arg(node, 6, "w_format") or INT, a_format=a_format,
                             w_mult=_arg(node, 7, "w_mult"))
    if not is_grouped_mm(node.target) or len(node.args) < 3 and "offs" not in node.kwargs:
        return None
    if any(_arg(node, i, name) is not None for i, name in ((3, "bias"), (4, "out_dtype"))):
        return None
    x, w, offs = node.args[0], node.args[1], _arg(node, 2, "offs")
    transposed = _is(w, aten.transpose.int) and sorted(a % 3 for a in w.args[1:3]) == [1, 2]
    inner = w.args[0] if transposed else w
    if transposed and _is(inner, aten.view.default) and _is(inner.args[0], q4.dequantize_weight_int4.default):
        w_dq = inner.args[0]
        packed, w_step = w_dq.args[:2]
        w_format, w_mult = _arg(w_dq, 4, "format") or INT, _arg(w_dq, 5, "w_mult")
        if _is(x, q4.dequantize_per_tensor.default):
            source, bits, quant, a_format = _codes(x.args[0])
            return GroupedLinear(node, FAKE_QUANT, source if quant is not None else x, offs, a_bits=bits,
                                 quant=quant, x_dq=x, w_dq=w_dq, packed=packed, w_step=w_step, a_step=x.args[1],
                                 w_format=w_format, a_format=a_format, w_mult=w_mult)
        return GroupedLinear(node, WEIGHT_ONLY, x, offs, w_dq=w_dq, packed=packed, w_step=w_step,
                             w_format=w_format, w_mult=w_mult)
    return GroupedLinear(node, FLOAT, x, offs, weight=inner, transposed=transposed)


# on a quantized grouped GEMM: the user's name of the expert weight it was made from (insert-quantizers)
EXPERT_WEIGHT = "q4_expert_weight"


def grouped_name(node: fx.Node) -> str:
    """What reports call a grouped expert GEMM: its expert weight's name
    (`model.layers.0.mlp.experts.gate_up_proj`), else its module path, else the node's name."""
    g = match_grouped(node)
    weight = g.weight if g is not None and g.form == FLOAT else None
    name = node.meta.get(EXPERT_WEIGHT) or (weight.meta.get(ir.FQN) if isinstance(weight, fx.Node) else None)
    return name or ir.module_path(node) or node.name


def constant_expert_weight(gm: fx.GraphModule, node: Any) -> tuple[fx.Node, torch.Tensor] | None:
    """(its constant node, W as [E, N, K]) when `node` is a float grouped GEMM reading a constant
    3-D float weight (what insert-quantizers rewrites, and calibration observes); else None."""
    g = match_grouped(node)
    if g is None or g.form != FLOAT:
        return None
    weight = ir.get_constant(gm, g.weight)
    if weight is None or weight.dim() != 3 or not weight.is_floating_point():
        return None
    return g.weight, weight if g.transposed else weight.transpose(-2, -1)
