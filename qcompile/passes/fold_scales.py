"""fold-scales: fold every per-channel (or scalar) constant multiply around a linear into constants or weights.

A multiply by a constant next to a linear costs a pass over the activation at run time and, in
front of a quantizer, distorts the range the quantizer sees. It folds exactly into:

    mul(layer_norm(a, w, b), c)  -> layer_norm(a, w * c, b * c)   (rms_norm alike)
    mul(mul(a, c1), c2)          -> mul(a, c1 * c2)          a norm's weight absorbs a later scale
    linear(mul(x, c), W, b)      -> linear(x, W * c, b)      the reading linears' columns
    mul(linear(x, W, b), c)      -> linear(x, W * c[:, None], b * c)   the producing linear's rows

(`div` by c likewise, with 1 / c.) A multiply is folded only where that is provably the same
function: the constant broadcasts along the last dimension only (shape [C], [1] or a scalar),
the folded-away node has no other reader. A multiply that linears (with constant weights) read
beside other ops is folded into those linears' columns and stays for the others: no quantizer
reads a scaled input, and the other readers see what they saw. A norm's own weight (`weight * h`
after the RMS normalization, or layer_norm's weight) stays where it is: it is where migrated
scales live, and folding it into the linears would undo the migration; so does the multiply
migrate-scales puts on attention's output (`ir.MIGRATION_SCALE`). Into a linear's weight, the
scale goes as a weight expression (`aten.mul(W, c)`, core/weights.py), computed when read and
rounded by insert-quantizers: no scaled float copy of the weight is held; into a norm's vectors, as
new constants.

Before:
    h = aten.mul(w_norm, normalized)             # the norm's weight: kept
    s = aten.mul(h, layer_scale)                 # layer_scale: f32[C] constant
    q = aten.linear(s, w_q)
After:
    h = aten.mul(w_norm_folded, normalized)      # w_norm * layer_scale
    q = aten.linear(h, w_q)

This pass declares the invariant `per-channel-scales-are-folded`, which the verifier checks on
every graph fold-scales has run on, from then on: no per-channel constant multiply, other than a
norm's own weight, feeds a quantized linear's input or reads its output; the kernel epilogue is
the only per-channel arithmetic left around it.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.core import ir, qlinear, weights
from qcompile.core.pass_api import PassResult, QPass, register_pass
from qcompile.core.qlinear import CASTS
from qcompile.kernels import rotation as _rotation  # noqa: F401  (registers q4.rotate)

SCALE_OPS = {ir.aten.mul.Tensor, ir.aten.div.Tensor}
# Normalizations with an optional affine weight (and bias) argument: {op: (weight index, bias index)}
NORMS = {ir.aten.layer_norm.default: (2, 3), ir.aten.rms_norm.default: (2, None)}


def _norm_weight_arg(node: fx.Node) -> object:
    index = NORMS[node.target][0]
    return node.args[index] if len(node.args) > index else None


def constant_scale(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """(the other operand, c as a multiplier) when `node` multiplies or divides by a constant that
    broadcasts along the last dimension only; None otherwise."""
    if node.op != "call_function" or node.target not in SCALE_OPS or node.kwargs or len(node.args) != 2 \
            or weights.is_expression(node):  # a weight's own rewrite, not a scale of an activation
        return None
    a, b = node.args
    for other, const, index in ((a, b, 1), (b, a, 0)):
        if node.target is ir.aten.div.Tensor and index == 0:
            continue  # c / x is not a scale of x
        if not isinstance(other, fx.Node) or ir.constant_value(gm, other) is not None:
            continue
        value = ir.constant_value(gm, const)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # where x is (a GPU)
            value = torch.tensor(float(value), device=getattr(ir.fake_value(other), "device", None))
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() > 1:
            continue
        value = value.detach().float()
        return other, (1.0 / value if node.target is ir.aten.div.Tensor else value)
    return None


def is_normalized(gm: fx.GraphModule, node: object) -> bool:
    """Whether `node` is a normalized activation, through casts: `h * rsqrt(...)` (RMSNorm) or a
    layer_norm without affine weight."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in NORMS:  # without an affine weight: the next multiply is its weight
        return _norm_weight_arg(node) is None
    return node.target is ir.aten.mul.Tensor and any(
        isinstance(a, fx.Node) and a.target is ir.aten.rsqrt.default for a in node.args
    )


def is_norm_weight(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A norm's own weight multiply: a constant scale of a normalized activation."""
    found = constant_scale(gm, node)
    return found is not None and is_normalized(gm, found[0])


def is_kept_scale(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A multiply where migrated scales live: a norm's own weight, or the one migrate-scales put
    on attention's output (folding it into the reading linear would undo the migration)."""
    return is_norm_weight(gm, node) or bool(node.meta.get(ir.MIGRATION_SCALE))


_ROTATE = torch.ops.q4.rotate.default


def per_channel_scales_are_folded(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Once fold-scales has run: no constant multiply (other than a norm's own weight) produces a
    quantized linear's input (through its quantize, rotation and casts) or reads its output; the
    kernel epilogue is the only per-channel arithmetic left around a quantized linear. (A linear
    whose output also goes elsewhere, as into GPT-2's tanh GELU `0.5 * x * (1 + tanh(...x...))`,
    keeps its multiply: no epilogue can scale one use and not the other.)"""
    if node.op == "call_function" and node.target is torch.ops.q4.quantize_per_tensor.default:
        producer = node.args[0]
        while isinstance(producer, fx.Node) and producer.op == "call_function" and (
            producer.target in CASTS or producer.target is _ROTATE
        ):
            producer = producer.args[0]
        if isinstance(producer, fx.Node) and constant_scale(gm, producer) and not is_kept_scale(gm, producer):
            return f"its input comes from a constant multiply %{producer.name} that fold-scales left"
    q = qlinear.match(node)
    if q is not None and q.quantized and len(node.users) == 1:
        for user in node.users:
            if constant_scale(gm, user):
                return f"its output is multiplied by a constant in %{user.name}, which belongs in the epilogue"
    return None


@register_pass
class FoldScales(QPass):
    name = "fold-scales"
    summary = "Fold constant per-channel multiplies into a norm weight, the reading linears' columns, or the producing linear's rows."
    statistics = ("scales-folded-into-norms", "scales-folded-into-scales", "scales-folded-into-columns", "scales-folded-into-rows",
                  "scales-left")
    invariants = (per_channel_scales_are_folded,)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in self.nodes(gm):
            if node.op == "call_function" and node.users:
                modified |= self._fold(gm, node)
        if modified:
            gm.graph.eliminate_dead_code()
            ir.delete_unused_constants(gm)
            gm.recompile()
        return PassResult(gm, modified)

    def _fold(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Fold `node` if it is a constant scale: by the first rule that applies."""
        found = constant_scale(gm, node)
        if found is None or is_kept_scale(gm, node):
            return False
        x, c = found
        channels = ir.fake_value(node).shape[-1] if ir.fake_value(node) is not None else None
        if c.dim() == 1 and c.shape[0] not in (1, channels):
            return False
        rules = (self._into_norm, self._into_scale, self._into_columns, self._into_rows, self._into_some_columns)
        if any(rule(gm, node, x, c) for rule in rules):
            return True
        if any(qlinear.weight_shape(gm, u) is not None for u in node.users) or qlinear.weight_shape(gm, x) is not None:
            self.count("scales-left")
        return False

    def _constant(self, gm: fx.GraphModule, stem: str, value: torch.Tensor, before: fx.Node, source: fx.Node) -> fx.Node:
        with gm.graph.inserting_before(before):
            new = gm.graph.get_attr(ir.add_constant(gm, f"{stem}_folded", value.contiguous()))
        return ir.mark_created(new, self.name, [source])

    def _into_norm(self, gm, node, x, c) -> bool:
        """mul(layer_norm(a, shape, w, b), c) -> layer_norm(a, shape, w * c, b * c) (rms_norm: w only)."""
        if x.op != "call_function" or x.target not in NORMS or len(x.users) != 1:
            return False
        w_index, b_index = NORMS[x.target]
        weight = ir.get_constant(gm, _norm_weight_arg(x))
        bias_node = x.args[b_index] if b_index is not None and len(x.args) > b_index else None
        bias = ir.get_constant(gm, bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None) or (c.dim() == 1 and c.shape[0] != weight.shape[-1]):
            return False
        for index, old, value in ((w_index, x.args[w_index], weight), (b_index, bias_node, bias)):
            if value is not None:
                new = self._constant(gm, str(old.meta.get(ir.FQN, old.target)), value * c.to(value.dtype), x, node)
                x.update_arg(index, new)
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        self.count("scales-folded-into-norms")
        return True

    def _into_scale(self, gm, node, x, c) -> bool:
        """mul(mul(a, c1), c) -> mul(a, c1 * c): the inner constant absorbs this one."""
        inner = constant_scale(gm, x) if len(x.users) == 1 else None
        if inner is None:
            return False
        a, c1 = inner
        val = ir.fake_value(node)  # keep the activation's dtype (a bf16 model stays bf16)
        new_c = self._constant(gm, "scale", (c1 * c).to(val.dtype if val is not None else torch.float32), x, node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ir.aten.mul.Tensor, (a, new_c))
        ir.mark_created(new, self.name, [x, node])
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.count("scales-folded-into-scales")
        self._fold(gm, new)  # the merged scale folds on (`linear(x * 2 / 3)`: into the columns); the sweep is past it
        return True

    def _into_columns(self, gm, node, x, c) -> bool:
        """linear(mul(x, c), W) -> linear(x, W * c) for every reader, all linears with constant weights."""
        users = list(node.users)
        if not users or any(not self._reads_as_input(gm, u, node) for u in users):
            return False
        self._fold_columns(gm, node, x, c, users)
        gm.graph.erase_node(node)
        return True

    def _into_some_columns(self, gm, node, x, c) -> bool:
        """The same for the readers that are linears when other ops read the multiply too (say
        `h = x / n` feeding a linear and a matmul): the multiply stays for those others only."""
        users = [u for u in node.users if self._reads_as_input(gm, u, node)]
        if not users:
            return False
        self._fold_columns(gm, node, x, c, users)
        return True

    @staticmethod
    def _reads_as_input(gm, user: fx.Node, node: fx.Node) -> bool:
        return qlinear.weight_shape(gm, user) is not None and user.args[0] is node

    def _fold_columns(self, gm, node, x, c, users: list[fx.Node]) -> None:
        scaled = {}  # linears reading one input share its statistics: rescale them once (kept: ids stay theirs)
        for lin in users:
            shape, dtype = weights.shape_and_dtype(gm, lin.args[1])
            old = lin.args[1]
            # W[:, j] * c[j], computed when it is read (core/weights.py)
            new_w = weights.derive(gm, ir.aten.mul.Tensor, old, [c.to(dtype)], "folded", self.name, lin)
            lin.update_arg(0, x)
            lin.update_arg(1, new_w)
            weights.drop(gm, old)
            if ir.CALIB in lin.meta:  # the linear now reads x = (x * c) / c
                stats = lin.meta[ir.CALIB]
                if id(stats) not in scaled:
                    scaled[id(stats)] = stats, stats.scaled(c.expand(shape[1]))
                lin.meta[ir.CALIB] = scaled[id(stats)][1]
        self.count("scales-folded-into-columns")

    def _into_rows(self, gm, node, x, c) -> bool:
        """mul(linear(x, W, b), c) -> linear(x, W * c[:, None], b * c), the linear read only here."""
        shape = qlinear.weight_shape(gm, x)
        if shape is None or len(x.users) != 1:
            return False
        bias_node = qlinear.match(x).bias
        bias = ir.get_constant(gm, bias_node) if bias_node is not None else None
        if bias_node is not None and bias is None:
            return False
        old = x.args[1]
        rows = c.to(weights.shape_and_dtype(gm, old)[1]).expand(shape[0])
        # W[i, :] * c[i], computed when it is read (core/weights.py)
        new_w = weights.derive(gm, ir.aten.mul.Tensor, old, [rows[:, None].contiguous()], "folded", self.name, x)
        x.update_arg(1, new_w)
        weights.drop(gm, old)
        if bias is not None:
            new_b = self._constant(gm, str(bias_node.meta.get(ir.FQN, bias_node.target)), bias * rows.to(bias.dtype), x, node)
            if len(x.args) > 2:
                x.update_arg(2, new_b)
            else:
                x.update_kwarg("bias", new_b)
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        self.count("scales-folded-into-rows")
        return True
