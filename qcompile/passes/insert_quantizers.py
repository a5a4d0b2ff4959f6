"""insert-quantizers: quantize linear weights per output channel and their inputs per tensor (or token).

Every `aten.linear` whose weight is a frozen constant and whose input has calibration statistics
gets a fake-quantized form that runs as it stands (the "fake-quant reference" of the recipe):
the weight becomes packed int4 codes plus a per-output-channel step, the activation a static
per-tensor quantize (step = calibration absmax / qmax) followed by a dequantize.

Before:
    linear = aten.linear(x, w, b)                     # w: f32[N, K] constant

After:
    x_q = q4.quantize_per_tensor(x, a_step, 4)        # int8 codes in [-8, 7]
    x_dq = q4.dequantize_per_tensor(x_q, a_step, f32)
    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32)   # w_packed: u8[N, K/2]
    linear = aten.linear(x_dq, w_dq, b)

The activation step is `clip * absmax / qmax`, with the clipping ratio an earlier pass chose
(`q4_act_clip` meta, e.g. migrate-scales{method=qsm}) or, with `search-clip=true`, one searched
here on the calibration samples against the linear's output error; otherwise 1.

With `rounding=false` (the backend's `rounding` option, `Q4_ROUNDING=0`) nothing is inserted:
the graph stays the float function the earlier passes left, which must equal the model's own
(the exactness tests). Otherwise the fp32 weight constant is dropped: from here on only packed codes and steps are held.
Linears reading the same activation (q/k/v) share one quantize node. A linear without
calibration statistics, or whose module path (`qcompile.core.select`: `model.layers.0.mlp.up_proj`,
`lm_head` even when its weight is tied to the embedding) matches the `skip` regex, stays in float
with its reason in `q4_float_reason` meta and is counted in `linears-left-in-float`; other ops
that multiply by a constant (matmul, conv, ...) stay in float and are counted in
`unhandled-ops-in-float`.

`low-rank=r` adds LoRC (ZeroQuant-V2; MergeQuant's compensation): a rank-r float term fitted to
the weight's rounding error E = W - Q(W) through the input's Gram matrix, computed from the same
float input the quantizer reads (two small float linears):

    linear = aten.linear(x_dq, w_dq, b)
    out = aten.add(linear, aten.linear(aten.linear(x, B), A))      # A [N, r], B [r, K]

On SmolLM2 with w4a4's passes it moves little: 2048 tokens of Pride and Prejudice, 37.60 without,
36.01 at rank 32, 35.54 at rank 128 (FP32 20.83), while rank 32 in float32 adds about 70% to the
packed weights' bytes: no recipe uses it. What is left there is mostly the static activations'
error (w4a4-dynamic: 30.49).

A weight row or a calibrated activation that is all zeros has no range: its step is 1 (its codes
are 0), never 0, infinite or NaN, whatever the format, and `steps-fallback` counts the linears
concerned. Non-finite calibration values never get here: calibration stops on them, naming the
batch.

Each linear a run takes (rounding or not) records what was done in `q4_quantized` meta, an
`ir.QuantizedBy`:

    QuantizedBy(w_bits=4, a_bits=4, rounded=True, weights="gptq", act_clip=0.9,
                run="insert-quantizers{w-bits=4,a-bits=4,skip=lm_head,...}", w_format="int", a_format="int")

`w-group=32` gives each group of 32 consecutive k of a weight row a step of its own, an integer
multiple (1..15 for int4) of the row's step, held as uint8 multipliers beside the packed codes
(formats.py: the products code * multiplier still fit int8, so the integer kernels stay exact and
their epilogue per channel unchanged; llama.cpp's Q4_K nests its scales the same way):

    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32, w_mult=w_mult)   # w_mult: u8[N, K/32]

A linear whose K is not a multiple of the group, or whose weight format leaves no multiplier above 1
(E3M0, whose values reach 64), keeps one step per row (`weights-per-channel`).
On all-MiniLM-L6-v2 with float activations (GPTQ, 512 Emma sentences, 200 P&P sentences), the
cosine to FP32 goes from 0.9798 per channel to 0.9882 with groups of 32 (scratch script).

Number formats (`qcompile/kernels/formats.py`): codes are integers by default; `w-format` / `a-format`
pick one of LLM-FP4's 4-bit floats (e2m1, e3m0, e1m2), or `search` for the one with the least
layer-output error on the calibration samples, per linear, alternating weight and activation as
LLM-FP4 does (the activation's clipping ratio, its "exponent bias", is searched with it). FP4
codes are small integers too, so the same fused integer kernel runs them:

    x_q = q4.quantize_per_tensor(x, a_step, 4, "e3m0")          # int8 values in +-{0, 1, 2, 4, ..., 64}
    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32, "e2m1")

`activations=dynamic` is the reference static quantization is measured against: each token's
step computed at run time from its own absmax (QuaRot's and SpinQuant's setting), no calibration
range; the linear's epilogue multiplies by a_step[token] * w_step[n]:

    a_step = q4.token_steps(x, 4, 1.0)                 # f32[..., 1]
    x_q = q4.quantize_per_tensor(x, a_step, 4)

`sinks=true` (static activations) gives each sequence's first token, its attention sink, a
step and codes of its own. Its activations are hundreds of times the others' (SmolLM2's
layer-11 down_proj input: norm 3210 at the first token, at most 17 at any other), so one static
step per tensor either clips it or leaves the other tokens a handful of codes. The graph's
positions (`qcompile.core.positions`: what its rotary embedding reads, or BERT's position-id
buffer) say which rows are at position 0, at run time: a prompt's first row, never a decode
step's. Those rows take `sink-bits` (8) integer codes with a
step from calibration's first rows (`ChannelStats.sinks`), the others `a-bits` codes stepped by
the rest's range (`ChannelStats.rest_absmax`); the step per row goes to the kernel's epilogue as
a dynamic one does, and both steps are constants (PrefixQuant's observation that the outlier
tokens are few and known in advance, kept static):

    first = aten.eq(positions, 0)                                    # bool[1, T, 1], once a graph
    sinks = aten.expand_as(first, aten.slice(x, -1, 0, 1))           # bool[B, T, 1]
    a_step = aten.where(sinks, sink_step, step)                      # f32[B, T, 1]
    x_q = q4.quantize_per_tensor(x, a_step, 4, "int", sinks, 8)      # 8-bit codes at position 0

On SmolLM2 (2048 tokens of Pride and Prejudice, 4 x 512 calibration tokens, eager lowering)
it takes w4a4-hadamard from 36.43 to 29.00 and learned-rotation w4a4 from 33.15 to 28.23 (FP32
20.83). A scratch variant gave the first token 4-bit codes with a step of its own (its own
absmax, at run time): 119.8; in float: 29.00, what 8 bits give. A graph
without positions it can read (OPT's and RoBERTa's are offset, computed from the attention mask)
keeps one step for all rows, and the linear says why in `q4_sinks` meta and in `qcompile explain`.

A mixture of experts' grouped GEMM (transformers' `grouped_mm_experts_forward`: Mixtral's,
Qwen-MoE's experts; `qcompile.core.qlinear.match_grouped`) whose 3-D expert weight W [E, N, K]
is a constant is quantized too: the experts' weights stacked into one [E * N, K] weight, rounded
per output row like a linear's (so each expert per row; GPTQ, where the options ask for it, with
the Gram matrix of every expert's rows pooled), and its input [S, K] (the rows of all experts,
sorted by expert) quantized with ONE static step for the op: calibration pools every expert's
rows, there is no step per expert. fuse-kernels makes it `q4.grouped_linear_w4a4`:

    x_q = q4.quantize_per_tensor(x, a_step, 4)
    x_dq = q4.dequantize_per_tensor(x_q, a_step, f32)
    w_dq = q4.dequantize_weight_int4(w_packed, w_step, K, f32)      # w_packed: u8[E * N, K/2]
    out = transformers.grouped_mm_fallback(x_dq, aten.transpose(aten.view(w_dq, [E, N, K]), -2, -1), offs)

(`aten._grouped_mm` in bf16). Neither migrate-scales nor rotate-inputs touches the experts, and
the router (the linear whose output reaches top-k) stays in float. With a-bits=16 the grouped
GEMM reads x as it is and the dequantized weight (weight-only: packed storage, no fused kernel).

The pass may run more than once with different bit widths: `only` (a module-path regex) limits
one run to the linears it matches, and a run leaves linears an earlier run took alone, so
`insert-quantizers{only=lm_head,skip=,a-bits=8},insert-quantizers{...}` gives the head 8-bit
activations and the rest what the second run says. The recipes put the head's run last: by then
the other linears' float weight copies (migrated, rotated) are packed int4, so the head's GPTQ and
clipping search (temporaries of its 49152 x 576 weight, on SmolLM2) do not add to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.algorithms import gptq
from qcompile.algorithms import scale_search as search
from qcompile.core import ir, qlinear, weights
from qcompile.core.memo import memoized, replaying
from qcompile.core.pass_api import PassResult, PipelineError, QPass, option, register_pass
from qcompile.core.pipeline import PassSpec
from qcompile.core.positions import token_positions
from qcompile.core.select import LinearFilter
from qcompile.kernels import formats

q4 = torch.ops.q4
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the q4 ops compute in
FLOAT_ACTIVATIONS = 16  # a-bits=16: weight-only quantization, the linear reads x as it is

# Ops that multiply by a weight-like constant but are not (yet) quantized: counted, left in float
# with a reason (so is any op named *grouped_mm*: a mixture of experts' grouped GEMM).
UNHANDLED = {
    ir.aten.matmul.default, ir.aten.mm.default, ir.aten.bmm.default, ir.aten.addmm.default,
    ir.aten.einsum.default, ir.aten.conv1d.default, ir.aten.conv2d.default, ir.aten.conv3d.default,
}
# What a weight passes through on its way into such an op (3-D expert weights: transposed, indexed).
_WEIGHT_VIEWS = {
    ir.aten.t.default, ir.aten.transpose.int, ir.aten.permute.default, ir.aten.view.default,
    ir.aten.reshape.default, ir.aten.expand.default, ir.aten.unsqueeze.default, ir.aten.index.Tensor,
    ir.aten.select.int, ir.aten.slice.Tensor, ir.aten.contiguous.default, ir.aten.clone.default,
    ir.aten._to_copy.default, ir.aten.to.dtype,
}
# From a router's logits to the experts it picks: no more than a few of these ops lie between.
_ROUTER_PATH = {
    ir.aten.softmax.int, ir.aten._softmax.default, ir.aten.sigmoid.default, ir.aten._to_copy.default,
    ir.aten.to.dtype, ir.aten.view.default, ir.aten.reshape.default, ir.aten.add.Tensor,
}


def _weight_constant(gm: fx.GraphModule, node: Any, depth: int = 6) -> fx.Node | None:
    """The constant of at least 2 dimensions `node` is a view, slice or gather of, if any."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        value = ir.get_constant(gm, node)
        if value is not None:
            return node if value.dim() >= 2 and value.is_floating_point() else None
        if node.op != "call_function" or node.target not in _WEIGHT_VIEWS:
            return None
        node = node.args[0]
    return None


def _unhandled_weight_op(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The constant weight a matmul-like op other than aten.linear reads, if any."""
    if node.op != "call_function" or not (node.target in UNHANDLED or "grouped_mm" in str(node.target)):
        return None
    return next((c for c in map(lambda a: _weight_constant(gm, a), node.args) if c is not None), None)


def _picks_experts(node: fx.Node, depth: int = 4) -> bool:
    """Does this linear's output choose experts (reach an aten.topk through a softmax, a cast, a
    view)? Then it is a mixture of experts' router."""
    frontier = [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(u.target is ir.aten.topk.default for u in frontier):
            return True
        frontier = [u for u in frontier if u.target in _ROUTER_PATH]
    return False


def _zero_rows(weight: torch.Tensor) -> int:
    """How many rows of a 2-D weight are all zeros (by their max and min: |w| would copy the
    weight, 108 MiB for SmolLM2's head)."""
    if not weight.shape[1]:
        return weight.shape[0]
    w = weight.detach()
    return int(((w.amax(dim=1) == 0) & (w.amin(dim=1) == 0)).sum())


@dataclass(frozen=True)
class InsertQuantizersOptions:
    w_bits: int = option(4, choices=(2, 3, 4), help="weight bits (symmetric, per output channel)")
    a_bits: int = option(4, choices=(2, 3, 4, 5, 6, 7, 8, 16),
                         help="activation bits (static, per tensor); 16 keeps activations in float (weight-only)")
    skip: str = option("lm_head", help="regex on the module path of linears to keep in float ('' keeps none)")
    only: str = option("", help="regex on the module path: quantize only the linears it matches, leave the rest "
                               "to a later insert-quantizers ('' matches all)")
    search_clip: bool = option(False, help="search the activation clipping ratio on calibration samples where no earlier pass chose one")
    unmatched: str = option("quantize", choices=("quantize", "float"),
                            help="linears migrate-scales could not match: quantize them without migration, or keep them in float")
    rounding: bool = option(True, help="false: insert nothing, so the graph stays the float function the earlier passes left (the exactness check)")
    weights: str = option("rtn", choices=("rtn", "gptq"),
                          help="how weights are rounded: rtn (to nearest) or gptq (errors compensated through the input's Gram matrix)")
    w_format: str = option("int", choices=(*formats.FORMATS, "search"),
                           help="number format of the weight codes: int, a 4-bit float (LLM-FP4), or search: per linear, "
                                "the float format with the least output error on calibration samples")
    a_format: str = option("int", choices=(*formats.FORMATS, "search"),
                           help="number format of the activation codes, as w-format (a float format needs a-bits=4)")
    low_rank: int = option(0, help="rank of a float term fitted to each weight's quantization error through its input's "
                                   "Gram matrix and added to the linear's output (LoRC); 0: none")
    activations: str = option("static", choices=("static", "dynamic"),
                              help="static: one step per tensor from calibration; dynamic: a step per token computed "
                                   "at run time (q4.token_steps), the reference static is measured against")
    sinks: bool = option(False, help="static activations: each sequence's first token (position 0, its attention "
                                     "sink) gets a static step of its own and sink-bits codes")
    sink_bits: int = option(8, choices=(4, 5, 6, 7, 8), help="bits of the first token's activation codes (sinks=true)")
    w_group: int = option(0, help="k of a weight step group: 0, one step per output channel; a multiple of 32, each "
                                  "group of that many k an integer multiple (1..15 for int4) of the row's step")

    def __post_init__(self) -> None:
        for side, fmt, bits in (("w", self.w_format, self.w_bits), ("a", self.a_format, self.a_bits)):
            if fmt != formats.INT and bits != 4:
                raise PipelineError(f"insert-quantizers: {side}-format={fmt} is a 4-bit float format: it needs "
                                    f"{side}-bits=4, got {side}-bits={bits}")
        if self.sinks and self.sink_bits < self.a_bits and self.a_bits != FLOAT_ACTIVATIONS:
            raise PipelineError(f"insert-quantizers: sink-bits={self.sink_bits} is below a-bits={self.a_bits}: "
                                "the first token's codes are never narrower than the others'")
        if self.w_group < 0 or self.w_group % formats.GROUP_ALIGN:
            raise PipelineError(f"insert-quantizers: w-group must be 0 (a step per output channel) or a multiple of "
                                f"{formats.GROUP_ALIGN}, got {self.w_group}")
        if self.low_rank < 0:
            raise PipelineError(f"insert-quantizers: low-rank must be >= 0 (0: no compensation), got {self.low_rank}")

    def candidates(self, side: str) -> tuple[str, ...]:
        """The formats a linear's weight ("w") or activation ("a") may take."""
        fmt = self.w_format if side == "w" else self.a_format
        return tuple(formats.FLOAT_FORMATS) if fmt == "search" else (fmt,)


def activation_step(absmax: torch.Tensor, bits: int, clip: float = 1.0, fmt: str = formats.INT) -> torch.Tensor:
    """Per-tensor symmetric step clip * max(absmax) / max_value (qmax for int); an all-zero
    activation gets step 1."""
    peak = absmax.max().float() * clip
    if not torch.isfinite(peak):
        raise ValueError(f"calibration absmax is not finite ({peak.item()})")
    return (peak / formats.max_value(fmt, bits)) if peak > 0 else torch.tensor(1.0, device=absmax.device)


@register_pass
class InsertQuantizers(QPass):
    name = "insert-quantizers"
    summary = ("Quantize linear weights per output channel and their inputs per tensor (static) or per token "
               "(dynamic), as integers or 4-bit floats.")
    Options = InsertQuantizersOptions
    statistics = ("linears-quantized", "linears-left-in-float", "quantizers-shared", "unhandled-ops-in-float",
                  "weights-gptq", "linears-not-rounded", "formats-searched", "steps-fallback", "linears-compensated",
                  "linears-with-sinks", "linears-without-sinks", "weights-grouped", "weights-per-channel",
                  "expert-gemms-quantized")
    after = {
        "migrate-scales": "it rewrites float weight constants, which insert-quantizers replaces with packed codes",
        "fold-scales": "it folds scales into float weight constants, which insert-quantizers replaces with packed codes",
        "rotate-inputs": "it rotates float weight constants, which insert-quantizers replaces with packed codes",
    }

    def calibration_needs(self) -> frozenset[str]:
        opts = self.options
        return frozenset({"gram"}) if (opts.weights == "gptq" or opts.low_rank) and opts.rounding else frozenset()

    def call(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        graph = gm.graph
        run = str(PassSpec.of(self))
        # One quantize node per (activation, step): q/k/v read the same normalized input.
        quantizers: dict[tuple[fx.Node, float], fx.Node] = {}
        self._positions = token_positions(gm) if opts.sinks else None
        self._sink_masks: dict[str, fx.Node] = {}  # by the activations' leading shape
        linears = LinearFilter(skip=opts.skip, only=opts.only)
        modified = False
        for node in self.nodes(gm):
            if qlinear.constant_expert_weight(gm, node) is not None and ir.QUANTIZED not in node.meta:
                if linears.selects(node):  # else a later run's (only=)
                    reason = self._quantize_experts(gm, node, run, linears, quantizers)
                    if reason is None:
                        modified = modified or opts.rounding  # rounding=false only records it
                        continue
                    node.meta[ir.FLOAT_REASON] = reason
                    self.count("unhandled-ops-in-float")
                elif ir.FLOAT_REASON not in node.meta:
                    node.meta[ir.FLOAT_REASON] = "no insert-quantizers run took it (see their only=/skip=)"
                continue
            weight_of = _unhandled_weight_op(gm, node)
            if weight_of is not None:
                op = str(node.target).removesuffix(".default")
                shape = "x".join(map(str, ir.get_constant(gm, weight_of).shape))
                node.meta[ir.FLOAT_REASON] = f"{op} of a constant {shape} weight: no quantized kernel for this op"
                self.count("unhandled-ops-in-float")
            q = qlinear.match(node)
            if q is None or q.quantized or ir.QUANTIZED in node.meta or ir.LOW_RANK in node.meta \
                    or not linears.selects(node):
                continue  # not a float linear, an earlier insert-quantizers' work, or a later one's
            weight = qlinear.constant_weight(gm, node)
            stats = node.meta.get(ir.CALIB)
            reason = None
            if weight is None:
                reason = "its weight is not a constant 2-D float tensor"
            elif weight.dtype not in KERNEL_DTYPES:
                reason = f"its weight is {str(weight.dtype).removeprefix('torch.')}: the q4 kernels take float32, float16, bfloat16"
            elif stats is None:
                reason = "no calibration statistics reach it"
            elif linears.skips(node):
                reason = f"its module path matches skip={opts.skip!r}"
            elif _picks_experts(node):
                reason = "a mixture-of-experts router: its output picks the experts (top-k), which rounding would change"
            elif opts.unmatched == "float" and node.meta.get(ir.MIGRATION, {}).get("status") == "unmatched":
                reason = "unmatched=float: migration found no structure"
            if reason is not None:
                node.meta[ir.FLOAT_REASON] = reason
                self.count("linears-left-in-float")
                continue
            # an earlier run's skip= (the recipes round the head last) no longer holds, nor for the
            # nodes made from this one (mark_created copies its meta)
            node.meta.pop(ir.FLOAT_REASON, None)
            if not opts.rounding:
                # quantize . dequantize without rounding is the identity, and packed int4 cannot
                # hold unrounded codes: the linear stays as it is
                node.meta[ir.QUANTIZED] = ir.QuantizedBy(opts.w_bits, opts.a_bits, False, opts.weights, None, run)
                self.count("linears-not-rounded")
                continue
            x, w_node = q.input, q.weight
            dtype = ir.fake_value(x).dtype
            k = weight.shape[1]
            stem = w_node.meta.get(ir.FQN, w_node.target)
            w_format, a_format, clip = self._choose_formats(gm, node, weight, stats, stem)
            # what the weight's expression and the clipping search freed, given back before GPTQ
            # allocates (SmolLM2's head: the pass peaked at 1581 MiB resident, 1545 with this,
            # below calibration's peak; /tmp scratch quick_bench.py)
            self.trim_memory()
            packed, w_step, w_mult, method, group = self._round_weight(gm, weight, stats, w_format, stem)
            # an all-zero weight row or activation has no range: its step is 1 (codes 0), never 0 or NaN
            if _zero_rows(weight) or (opts.a_bits != FLOAT_ACTIVATIONS and opts.activations == "static"
                                      and not bool(stats.absmax.max() > 0)):
                self.count("steps-fallback")
            with graph.inserting_before(node):
                x_in, clip, w_dq, made = self._operands(gm, node, x, stats, dtype, stem, a_format, clip,
                                                        quantizers, packed, w_step, w_mult, k, w_format)
                new = graph.call_function(ir.aten.linear.default, (x_in, w_dq, q.bias))
            for created in (*made, new):
                ir.mark_created(created, self.name, [node])
            if ir.SINKS in node.meta:  # what _sink_mask found, from the linear being replaced
                new.meta[ir.SINKS] = node.meta[ir.SINKS]
            new.meta[ir.QUANTIZED] = ir.QuantizedBy(opts.w_bits, opts.a_bits, True, method, clip, run,
                                                    w_format, a_format if clip is not None else formats.INT, group)
            output = new
            if opts.low_rank and stats.num_tokens and (stats.observed_gram is not None or replaying(gm)):
                output = self._compensate(gm, node, new, x, weight, packed, w_step, w_mult, w_format, stats, stem)
            node.replace_all_uses_with(output)
            graph.erase_node(node)
            del weight  # computed from its expression (core/weights.py) for this linear alone: freed now
            weights.drop(gm, w_node)
            self.count("linears-quantized")
            modified = True
        if modified:
            ir.delete_unused_constants(gm)
            gm.recompile()
        return PassResult(gm, modified)

    def _operands(self, gm: fx.GraphModule, node: fx.Node, x: fx.Node, stats, dtype: torch.dtype, stem: str,
                  a_format: str, clip: float | None, quantizers: dict, packed: torch.Tensor, w_step: torch.Tensor,
                  w_mult: torch.Tensor | None, k: int, w_format: str) -> tuple[fx.Node, float | None, fx.Node, list]:
        """(x's fake-quant form, or x itself when weight-only; the clip, None when weight-only; the
        dequantized weight from new constants; the weight nodes made, for `mark_created`)."""
        graph = gm.graph
        if self.options.a_bits == FLOAT_ACTIVATIONS:  # weight-only: the dequantized weight, x as it is
            x_in, clip = x, None
        else:
            x_in = self._fake_quant_activation(gm, node, stats, dtype, stem, a_format, clip, quantizers)
        constants = [graph.get_attr(ir.add_constant(gm, f"{stem}{suffix}", value))
                     for suffix, value in (("_packed", packed), ("_step", w_step), ("_mult", w_mult)) if value is not None]
        format_arg = () if w_format == formats.INT else (w_format,)
        w_dq = graph.call_function(q4.dequantize_weight_int4.default, (*constants[:2], k, dtype, *format_arg),
                                   {} if w_mult is None else {"w_mult": constants[2]})
        return x_in, clip, w_dq, [*constants, w_dq]

    def _round_weight(self, gm: fx.GraphModule, weight: torch.Tensor, stats, w_format: str,
                      stem: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str, int]:
        """(packed codes, w_step [N], w_mult or None, "rtn" or "gptq", group) of a 2-D weight [N, K]:
        GPTQ where the options ask for it and the Gram matrix is there, else round to nearest; in
        groups of w-group k where K allows."""
        opts = self.options
        k = weight.shape[1]
        # E3M0's values reach 64: a multiplier of 1 is all that fits int8, so no groups
        grouped = opts.w_group and k % opts.w_group == 0 and formats.max_multiplier(w_format) > 1
        group = opts.w_group if grouped else 0
        if opts.w_group:
            self.count("weights-grouped" if group else "weights-per-channel")
        # A replayed artifact holds GPTQ's results (packed), not the Gram matrices they came from.
        # (`observed_gram`: whether there is one, without computing it; only a memo miss reads it)
        if opts.weights == "gptq" and stats.num_tokens and (stats.observed_gram is not None or replaying(gm)):
            def run_gptq(weight=weight, fmt=w_format, group=group):
                codes, *steps = gptq.quantize_gptq(weight, stats.gram, opts.w_bits, fmt, group)
                return formats.pack(codes, fmt), *steps

            key = (weight, opts.w_bits) if w_format == formats.INT else (weight, opts.w_bits, w_format)
            packed, w_step, *w_mult = memoized(gm, "gptq", stem, (*key, group) if group else key, run_gptq)
            self.count("weights-gptq")
            return packed, w_step, w_mult[0] if w_mult else None, "gptq", group
        if group:
            codes, w_step, w_mult = gptq.quantize_grouped(weight, group, opts.w_bits, w_format)
            return formats.pack(codes, w_format), w_step, w_mult, "rtn", group
        codes, w_step = formats.quantize_weight_per_channel(weight, w_format, opts.w_bits)
        return formats.pack(codes, w_format), w_step, None, "rtn", group

    def _quantize_experts(self, gm: fx.GraphModule, node: fx.Node, run: str, linears: LinearFilter,
                          quantizers: dict) -> str | None:
        """A mixture of experts' grouped GEMM G(x, W^T, offs), W a constant [E, N, K], becomes its
        fake-quant form (`qlinear.match_grouped`): the experts' weights stacked into one [E * N, K]
        weight and rounded per output row as a linear's are (so each expert per row: RTN, grouped
        steps, or GPTQ through the Gram matrix of all the op's rows, every expert's pooled), and x
        quantized with one static step for every expert's rows (calibration pools them). None when
        done, else why it stays in float."""
        opts, graph = self.options, gm.graph
        w_node, weight3 = qlinear.constant_expert_weight(gm, node)
        stats = node.meta.get(ir.CALIB)
        if weight3.dtype not in KERNEL_DTYPES:
            return f"its weight is {str(weight3.dtype).removeprefix('torch.')}: the q4 kernels take float32, float16, bfloat16"
        if stats is None:
            return "no calibration statistics reach it"
        if linears.skips(node):
            return f"its module path matches skip={opts.skip!r}"
        node.meta.pop(ir.FLOAT_REASON, None)  # an earlier run's (only=), which the new nodes would copy
        if not opts.rounding:  # the identity, as for a linear
            node.meta[ir.QUANTIZED] = ir.QuantizedBy(opts.w_bits, opts.a_bits, False, opts.weights, None, run)
            self.count("linears-not-rounded")
            return None
        experts, n, k = weight3.shape
        weight = weight3.reshape(experts * n, k)
        x = node.args[0]
        dtype = ir.fake_value(x).dtype
        stem = w_node.meta.get(ir.FQN, w_node.target)
        w_format, a_format, clip = self._choose_formats(gm, node, weight, stats, stem)
        packed, w_step, w_mult, method, group = self._round_weight(gm, weight, stats, w_format, stem)
        static = opts.a_bits != FLOAT_ACTIVATIONS and opts.activations == "static"
        if _zero_rows(weight) or (static and not bool(stats.absmax.max() > 0)):
            self.count("steps-fallback")  # as for a linear: a step of 1 where there is no range
        old_view = node.args[1]
        with graph.inserting_before(node):
            x_in, clip, w_dq, made = self._operands(gm, node, x, stats, dtype, stem, a_format, clip, quantizers,
                                                    packed, w_step, w_mult, k, w_format)
            w_experts = graph.call_function(ir.aten.view.default, (w_dq, [experts, n, k]))
            w_t = graph.call_function(ir.aten.transpose.int, (w_experts, -2, -1))
            new = graph.call_function(node.target, (x_in, w_t, *node.args[2:]), dict(node.kwargs))
        for created in (*made, w_experts, w_t, new):
            ir.mark_created(created, self.name, [node])
        if ir.SINKS in node.meta:
            new.meta[ir.SINKS] = node.meta[ir.SINKS]
        new.meta[ir.QUANTIZED] = ir.QuantizedBy(opts.w_bits, opts.a_bits, True, method, clip, run, w_format,
                                                a_format if clip is not None else formats.INT, group)
        new.meta[qlinear.EXPERT_WEIGHT] = stem  # the reports' name for it
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if isinstance(old_view, fx.Node) and old_view is not w_node and not old_view.users:
            graph.erase_node(old_view)  # the transposed view
        ir.drop_constant(gm, w_node)  # the float weight: freed now
        self.count("expert-gemms-quantized")
        return None

    def _compensate(self, gm: fx.GraphModule, node: fx.Node, quantized: fx.Node, x: fx.Node, weight: torch.Tensor,
                    packed: torch.Tensor, w_step: torch.Tensor, w_mult, fmt: str, stats, stem: str) -> fx.Node:
        """quantized + linear(linear(x, B), A): the low-rank term fitted to the weight's rounding
        error through the input's Gram matrix (`gptq.low_rank_compensation`), in float on the
        same input x the quantizer reads."""
        rank, graph = self.options.low_rank, gm.graph

        def fit():
            values = formats.apply_multipliers(formats.unpack(packed, weight.shape[1], fmt), w_mult)
            error = weight.float() - values.float() * w_step[:, None]
            return gptq.low_rank_compensation(error, stats.gram, rank)  # the Gram matrix on a miss only

        key = (weight, packed, w_step, rank) if w_mult is None else (weight, packed, w_step, w_mult, rank)
        a, b = memoized(gm, "low-rank", stem, key, fit)
        dtype = ir.fake_value(x).dtype
        with graph.inserting_before(node):  # the linear being replaced comes right after `quantized`
            b_node = graph.get_attr(ir.add_constant(gm, f"{stem}_low_rank_b", b.to(dtype)))
            a_node = graph.get_attr(ir.add_constant(gm, f"{stem}_low_rank_a", a.to(dtype)))
            inner = graph.call_function(ir.aten.linear.default, (x, b_node))
            outer = graph.call_function(ir.aten.linear.default, (inner, a_node))
            output = graph.call_function(ir.aten.add.Tensor, (quantized, outer))
        for created in (b_node, a_node, inner, outer, output):
            ir.mark_created(created, self.name, [node])
        module = ir.module_path(node) or stem
        for low in (inner, outer):
            low.meta[ir.LOW_RANK] = module
            low.meta[ir.FLOAT_REASON] = f"the rank-{a.shape[1]} compensation of {module}'s rounding error"
            low.meta.pop(ir.QUANTIZED, None)
        output.meta.pop(ir.QUANTIZED, None)
        self.count("linears-compensated")
        return output

    def _choose_formats(self, gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, stats,
                        stem: str) -> tuple[str, str, float]:
        """(weight format, activation format, activation clipping ratio) of one linear: the
        options' formats, the clip an earlier pass chose (`q4_act_clip` meta) or 1; searched on
        the calibration samples where the options say `search` (formats) or `search-clip=true`."""
        opts = self.options
        w_formats, a_formats = opts.candidates("w"), opts.candidates("a")
        if opts.a_bits == FLOAT_ACTIVATIONS:
            a_formats = (formats.INT,)
        clip = node.meta.get(ir.ACT_CLIP)
        # a clip searched for one static step has no meaning for per-token steps: 1 there
        if opts.activations == "dynamic":
            clip = 1.0
        wants_clip = clip is None and opts.search_clip and opts.a_bits != FLOAT_ACTIVATIONS
        searched = len(w_formats) > 1 or len(a_formats) > 1 or (wants_clip and a_formats != (formats.INT,))
        if searched and stats.samples.shape[0]:
            clips = search.CLIPS if wants_clip else (clip or 1.0,)

            def run_search():  # the memo holds numbers: the chosen formats by their index
                w, a, found, error = search.search_formats(stats.samples, weight, w_formats, a_formats, clips,
                                                           opts.w_bits, opts.a_bits)
                return w_formats.index(w), a_formats.index(a), found, error

            w_index, a_index, found, _ = memoized(
                gm, "search-formats", stem, (stats.samples, weight, "|".join(w_formats), "|".join(a_formats),
                                             *clips, opts.w_bits, opts.a_bits), run_search)
            if wants_clip:
                clip = node.meta[ir.ACT_CLIP] = float(found)
            self.count("formats-searched")
            return w_formats[int(w_index)], a_formats[int(a_index)], clip or 1.0
        if wants_clip and stats.samples.shape[0]:
            found, _ = memoized(gm, "search-clip", stem, (stats.samples, weight, opts.w_bits, opts.a_bits),
                                lambda: search.search_clip(stats.samples, [weight], torch.ones_like(stats.absmax),
                                                           search.CLIPS, opts.w_bits, opts.a_bits))
            clip = node.meta[ir.ACT_CLIP] = float(found)
        return w_formats[0], a_formats[0], clip or 1.0

    def _sink_mask(self, gm: fx.GraphModule, node: fx.Node, x: fx.Node, stats) -> fx.Node | None:
        """bool [..., 1] over x's rows, true at position 0 (the graph's own positions, see
        `qcompile.core.positions`), for a static quantizer with `sinks=true`; None where
        that does not apply (counted, with the reason on the linear). One mask per leading shape
        of the activations, built before the first linear that reads it."""
        opts = self.options
        if not opts.sinks or opts.activations != "static":
            return None
        value, positions = ir.fake_value(x), self._positions
        reason = None
        if positions is None:
            reason = "the graph has no token positions"
        elif value is None or value.dim() != 3 or str(value.shape[1]) != str(ir.fake_value(positions).shape[1]):
            reason = "its input is not [batch, tokens, channels] over the positions' tokens"
        elif stats.sink_absmax is None or stats.rest_absmax is None:
            reason = "calibration saw no sequence's first token"
        if reason is not None:
            node.meta[ir.SINKS] = f"none: {reason}"
            self.count("linears-without-sinks")
            return None
        node.meta[ir.SINKS] = f"first token {opts.sink_bits}-bit"
        self.count("linears-with-sinks")
        shape = str(tuple(value.shape[:-1]))
        if shape not in self._sink_masks:
            graph, aten = gm.graph, ir.aten
            with graph.inserting_before(node):
                first = graph.call_function(aten.eq.Scalar, (positions, 0))
                if ir.fake_value(positions).dim() == 2:
                    first = graph.call_function(aten.unsqueeze.default, (ir.mark_created(first, self.name, [node]), -1))
                rows = graph.call_function(aten.slice.Tensor, (x, -1, 0, 1))  # x's rows: the shape to broadcast to
                mask = graph.call_function(aten.expand_as.default, (ir.mark_created(first, self.name, [node]),
                                                                    ir.mark_created(rows, self.name, [node])))
            self._sink_masks[shape] = ir.mark_created(mask, self.name, [node])
        return self._sink_masks[shape]

    def _fake_quant_activation(self, gm: fx.GraphModule, node: fx.Node, stats, dtype: torch.dtype, stem: str,
                               fmt: str, clip: float, quantizers: dict) -> fx.Node:
        """dequantize(quantize(x)) of the linear's input, sharing the quantize node between the
        linears that read the same activation with the same step and format."""
        opts, graph, x = self.options, gm.graph, node.args[0]
        format_arg = () if fmt == formats.INT else (fmt,)
        sinks = self._sink_mask(gm, node, x, stats)
        if opts.activations == "dynamic":
            key = (x, "dynamic", clip, fmt)
        elif sinks is not None:
            a_step = activation_step(stats.rest_absmax, opts.a_bits, clip, fmt)
            sink_step = activation_step(stats.sink_absmax, opts.sink_bits)
            key = (x, float(a_step), float(sink_step), fmt)
        else:
            a_step = activation_step(stats.absmax, opts.a_bits, clip, fmt)
            key = (x, float(a_step), fmt)
        if key in quantizers:
            x_q = quantizers[key]
            self.count("quantizers-shared")
        else:
            extra: tuple = ()
            if opts.activations == "dynamic":  # per token, at run time
                a_step_node = graph.call_function(q4.token_steps.default, (x, opts.a_bits, clip, *format_arg))
            elif sinks is not None:  # per row: the first token's step or the others'
                steps = [graph.get_attr(ir.add_constant(gm, f"{stem}{suffix}", value))
                         for suffix, value in (("_sink_step", sink_step), ("_a_step", a_step))]
                a_step_node = graph.call_function(ir.aten.where.self, (sinks, *steps))
                for created in steps:
                    ir.mark_created(created, self.name, [node])
                extra = (fmt, sinks, opts.sink_bits)
            else:
                a_step_node = graph.get_attr(ir.add_constant(gm, f"{stem}_a_step", a_step))
            x_q = graph.call_function(q4.quantize_per_tensor.default,
                                      (x, a_step_node, opts.a_bits, *(extra or format_arg)))
            ir.mark_created(a_step_node, self.name, [node])
            ir.mark_created(x_q, self.name, [node])
            if opts.activations != "dynamic":  # what a call far outside is measured against
                seen = [stats.absmax, stats.sink_absmax if sinks is not None else None]
                x_q.meta[ir.CALIBRATED_RANGE] = max(float(t.max()) for t in seen if t is not None and t.numel())
            quantizers[key] = x_q
        x_dq = graph.call_function(q4.dequantize_per_tensor.default, (x_q, x_q.args[1], dtype))
        return ir.mark_created(x_dq, self.name, [node])
