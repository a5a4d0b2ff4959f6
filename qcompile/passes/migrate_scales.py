"""migrate-scales: move per-channel activation ranges out of the activation, into the weights.

For an activation `a` read only by quantizable linears (q/k/v; gate/up; a fused qkv; down_proj)
and produced by an op whose per-channel constants can absorb a scale, choose one scale vector s
(shared by every linear that reads `a`) and rewrite constants so the function is unchanged:

    norm weight   gamma[j] -> gamma[j] / s[j]     (LayerNorm: its bias too)
    or the rows of the linear producing a gated MLP's `up` side: W_up[j, :] -> W_up[j, :] / s[j]
    each linear   W[:, j]  -> W[:, j] * s[j]

so that a[j] / s[j] has a flatter range across channels and one per-tensor step fits it. With
`power-of-two=true` each s[j] is rounded to a power of two, so both rewrites only change exponents
(exact in any float format): LLM-FP4's pre-shifted exponent bias, a per-channel activation
exponent folded into the weights while the kernel keeps one per-tensor step. With
`method=smoothquant`, s[j] = max|a[j]|**alpha / max_i |W[i, j]|**(1 - alpha) (SmoothQuant), the
max over the weights of every linear in the group. With `method=qsm` (MergeQuant's quantization
step migration with adaptive clipping) the same family of scales is searched per group: the
migration strength alpha over a grid and the activation clipping ratio, alternately, each chosen
by the quantized output error of the group's linears on the calibration token samples; the clipping
ratio is left in the linears' `q4_act_clip` meta for insert-quantizers. Calibration statistics
of the linears' input are divided by s too, so quantizers placed later see the migrated ranges.

Structure comes from the graph, not from module names:
- the producer is `aten.layer_norm(x, shape, weight, bias)` with constant weight (and bias), or a
  `mul` by a per-channel vector computed from constants only: Llama/Mistral/Qwen2 RMSNorm
  (`weight * h`), Gemma's `h * (1 + weight)`;
- a gated MLP's down_proj input `act(gate(x)) * up(x)`: the scale goes into up_proj's output rows
  (the product is elementwise, so scaling `up` scales the activation);
- o_proj's input `sdpa(q, k, v)` with heads flattened: a multiply of its own, `x * (1 / s)`
  (`ir.MIGRATION_SCALE`, which fold-scales keeps and Inductor fuses into the rotation and
  quantize). Not v_proj's rows: v also flows into the KV cache, which must keep the model's own
  values so that prefill and decode graphs (and a prompt run uncompiled) agree;
- dtype casts between the producer and the linears are looked through;
- when `a` also feeds anything but a quantizable linear (BERT's post-norm residual, say), the
  migration would change that other use: it is left alone and counted.

The norm's vectors are rewritten as new constants; a linear's weight as a weight expression
(core/weights.py): `aten.mul(W, s)` (`aten.div(W_up, s[:, None])` for up_proj's rows), computed
when a later pass reads it and rounded by insert-quantizers, so no migrated float copy of every
weight is held in between.

Before:
    norm = aten.mul(w_norm, h)                 # w_norm: f32[C] constant
    q = aten.linear(norm, w_q); k = aten.linear(norm, w_k)
After:
    norm = aten.mul(w_norm_migrated, h)        # w_norm / s, a new constant
    w_q_migrated = aten.mul(w_q, w_q_migrated_scale)   # W[:, j] * s[j], an expression
    w_k_migrated = aten.mul(w_k, w_k_migrated_scale)
    q = aten.linear(norm, w_q_migrated); k = aten.linear(norm, w_k_migrated)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.algorithms import scale_search as search
from qcompile.algorithms.scale_search import CLIPS
from qcompile.core import ir, qlinear, weights
from qcompile.core.analysis import ActivationGroups, get_analysis
from qcompile.core.memo import memoized
from qcompile.core.pass_api import PassResult, QPass, option, register_pass
from qcompile.core.qlinear import CASTS
from qcompile.core.select import LinearFilter
from qcompile.kernels.rotation import rotation_factors

# Layout ops between attention heads and flat channels, and those of repeat_kv (GQA).
LAYOUT = {ir.aten.view.default, ir.aten.reshape.default, ir.aten._unsafe_view.default,
          ir.aten.transpose.int, ir.aten.contiguous.default, ir.aten.clone.default}
# The scale site of o_proj's input: one multiply by 1/s, inserted before the linears.
EXPLICIT = "explicit"


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op


@dataclass(frozen=True)
class MigrateScalesOptions:
    method: str = option("qsm", choices=("qsm", "smoothquant"), help="how the scale vector is chosen")
    alpha: float = option(0.5, help="smoothquant's migration strength: 0 keeps activations, 1 moves their whole range into weights")
    w_bits: int = option(4, choices=(2, 3, 4), help="qsm: weight bits the search measures with")
    a_bits: int = option(4, choices=(2, 3, 4, 5, 6, 7, 8), help="qsm: activation bits the search measures with")
    skip: str = option("lm_head", help="regex on the module path of linears to leave alone")
    rotated: bool = option(False, help="qsm: measure candidates as rotate-inputs will leave them (migrated input and weights rotated)")
    power_of_two: bool = option(False, help="round each scale to the nearest power of two: dividing the activation and "
                                           "multiplying the weight are then exact in any float format (LLM-FP4's "
                                           "pre-shifted exponent bias: per-channel exponents folded into the weights)")


ALPHAS = tuple(a / 10 for a in range(11))


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a**alpha / w**(1 - alpha), 1 where either side is zero (nothing to balance)."""
    s = act_absmax.clamp(min=1e-8).pow(alpha) / weight_absmax.clamp(min=1e-8).pow(1 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s)


def power_of_two(s: torch.Tensor) -> torch.Tensor:
    """Each scale rounded to the nearest power of two (in log2): 2**round(log2(s))."""
    return torch.exp2(torch.round(torch.log2(s)))


@register_pass
class MigrateScales(QPass):
    name = "migrate-scales"
    summary = "Migrate per-channel activation scales into the preceding norm and the following linears' weights."
    Options = MigrateScalesOptions
    statistics = ("groups-migrated", "linears-migrated", "activations-shared-with-non-linear",
                  "activations-without-affine-producer")
    before = {
        "rotate-inputs": "migration finds the norm or linear that produces a linear's input; after "
                         "rotation that input is a q4.rotate, which absorbs no scale",
    }

    def call(self, gm: fx.GraphModule) -> PassResult:
        linears = LinearFilter(skip=self.options.skip)
        groups = get_analysis(gm, ActivationGroups).select(lambda lin: ir.CALIB in lin.meta and linears.takes(lin))
        modified = False
        for activation, linears in self.progress(groups.items(), "group"):
            self.current_node = activation
            others = [user for user in activation.users if user not in linears]
            if others:
                self.count("activations-shared-with-non-linear")
                self._unmatched(linears, f"its input also feeds %{others[0].name} ({_op(others[0])}), "
                                         "which a migration would change")
                continue
            found = self._scale_sites(gm, activation)
            if found is None:
                self.count("activations-without-affine-producer")
                self._unmatched(linears, "no norm, producing linear or attention value absorbs a scale of its "
                                         f"input %{activation.name} ({_op(activation)})")
                continue
            for lin in linears:
                lin.meta[ir.MIGRATION] = {"status": "migrated", "reason": f"{self.options.method} scales, "
                                          f"shared by {len(linears)} linear(s)"}
            self._migrate(gm, activation, found, linears)
            self.count("groups-migrated")
            self.count("linears-migrated", len(linears))
            modified = True
        if modified:
            # the old constants (and Gemma's `1 + weight` chains): once, not per group
            gm.graph.eliminate_dead_code()
            ir.delete_unused_constants(gm)
            gm.recompile()
        return PassResult(gm, modified)

    @staticmethod
    def _unmatched(linears: list[fx.Node], reason: str) -> None:
        for lin in linears:
            lin.meta[ir.MIGRATION] = {"status": "unmatched", "reason": reason}

    # --- structure ---------------------------------------------------------------------------------

    def _scale_sites(self, gm: fx.GraphModule, activation: fx.Node) -> list[tuple[fx.Node, int]] | str | None:
        """Where 1/s can go: (node, arg index) of constants whose dim 0 runs over the activation's
        channels, such that dividing them by s divides the activation by s; EXPLICIT for
        attention's output (a multiply of its own); None if nowhere."""
        # Walk up through dtype casts; below the activation each step must have no other reader.
        node = activation
        while node.op == "call_function" and node.target in CASTS and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            if len(node.users) != 1:
                return None
        channels = ir.fake_value(activation).shape[-1]
        if node.target is ir.aten.layer_norm.default:
            weight = node.args[2] if len(node.args) > 2 else None
            bias = node.args[3] if len(node.args) > 3 else None
            if ir.get_constant(gm, weight) is None:
                return None
            return [(node, 2)] + ([(node, 3)] if ir.get_constant(gm, bias) is not None else [])
        if node.target is ir.aten.mul.Tensor:
            for i, arg in enumerate(node.args[:2]):
                value = ir.constant_value(gm, arg)
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == channels:
                    other = node.args[1 - i]
                    if isinstance(other, fx.Node) and ir.constant_value(gm, other) is None:
                        return [(node, i)]  # a norm's per-channel weight
            for arg in node.args[:2]:
                rows = self._producing_linear(gm, arg, channels)
                if rows is not None:
                    return rows  # a gated MLP: act(gate(x)) * up(x) -> up's output rows
        return EXPLICIT if self._is_attention_output(activation) else None

    @staticmethod
    def _is_attention_output(activation: fx.Node) -> bool:
        """o_proj's input: sdpa(q, k, v) with its heads flattened (through layout ops only)."""
        node = activation
        while node.op == "call_function" and node.target in LAYOUT:
            node = node.args[0]
            if not isinstance(node, fx.Node) or len(node.users) != 1:
                return False
        return node.op == "call_function" and node.target is ir.aten.scaled_dot_product_attention.default

    @staticmethod
    def _producing_linear(gm: fx.GraphModule, node: object, channels: int) -> list[tuple[fx.Node, int]] | None:
        """The weight (and bias) rows of the linear that alone produces `node`, through casts."""
        while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
            if len(node.users) != 1:
                return None
            node = node.args[0]
        weight = qlinear.weight_shape(gm, node)
        if weight is None or len(node.users) != 1 or weight[0] != channels:
            return None
        bias = qlinear.match(node).bias
        return [(node, 1)] + ([(node, 2)] if ir.get_constant(gm, bias) is not None else [])

    def _search(self, gm: fx.GraphModule, name: str, act, candidates: list[torch.Tensor],
                values: list[torch.Tensor]) -> tuple[int, float]:
        """QSM: which candidate scale vector (over the migration-strength grid), and which
        activation clipping ratio, give the least quantized output error on the samples."""
        if act.samples.shape[0] == 0:
            return ALPHAS.index(0.0), 1.0
        samples = act.samples
        rotation = [f.to(samples.device) for f in rotation_factors(samples.shape[1])] if self.options.rotated else None
        o = self.options

        def run() -> tuple[int, float]:
            best, clip = search.search_migration(samples, values, candidates, CLIPS, o.w_bits, o.a_bits,
                                                 rotation=rotation)
            return next(i for i, c in enumerate(candidates) if c is best), clip

        index, clip = memoized(gm, "search-migration", name,
                               (samples, values, candidates, o.w_bits, o.a_bits, o.rotated), run)
        return int(index), float(clip)

    # --- rewrite -----------------------------------------------------------------------------------

    def _migrate(self, gm: fx.GraphModule, activation: fx.Node, sites: list[tuple[fx.Node, int]] | str,
                 linears: list[fx.Node]) -> None:
        act = linears[0].meta[ir.CALIB]
        values = [weights.value(gm, lin.args[1]) for lin in linears]
        weight_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in values]).amax(dim=0)
        if self.options.method == "smoothquant":
            s = smoothquant_scales(act.absmax, weight_absmax, self.options.alpha)
        else:
            candidates = [smoothquant_scales(act.absmax, weight_absmax, a) for a in ALPHAS]
            name = linears[0].args[1].meta.get(ir.FQN, linears[0].name)
            k, clip = self._search(gm, name, act, candidates, values)
            s = candidates[k]
            for lin in linears:
                lin.meta[ir.ACT_CLIP] = clip
        if self.options.power_of_two:
            s = power_of_two(s)

        graph = gm.graph
        if sites == EXPLICIT:  # x -> x * (1 / s), which the linears (its only readers) read instead
            with graph.inserting_after(activation):
                inverse = graph.get_attr(ir.add_constant(gm, f"{activation.name}_inverse_scale_migrated",
                                                         (1 / s).to(ir.fake_value(activation).dtype)))
            with graph.inserting_after(inverse):
                scaled = graph.call_function(ir.aten.mul.Tensor, (activation, inverse))
            ir.mark_created(inverse, self.name, [activation])
            ir.mark_created(scaled, self.name, [activation])
            scaled.meta[ir.MIGRATION_SCALE] = True  # fold-scales keeps it, as it keeps a norm's weight
            activation.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
            sites = []
        for site, i in sites:
            old = site.args[i]
            stem = getattr(old, "meta", {}).get(ir.FQN) or f"{site.name}_arg{i}"
            if i == 1 and qlinear.match(site) is not None:  # a producing linear's weight rows: W[j, :] / s[j], computed when read
                dtype = weights.shape_and_dtype(gm, old)[1]
                new = weights.derive(gm, ir.aten.div.Tensor, old, [s.to(dtype)[:, None].contiguous()],
                                     "migrated", self.name, site)
            else:  # a norm's weight or bias, or a bias: a vector, folded now
                value = ir.constant_value(gm, old)
                with graph.inserting_before(site):
                    new = graph.get_attr(ir.add_constant(gm, f"{stem}_migrated", (value / s.to(value.dtype)).contiguous()))
                ir.mark_created(new, self.name, [old] if isinstance(old, fx.Node) else [site])
            site.update_arg(i, new)
            weights.drop(gm, old)
        # one set of statistics for the group's shared input (the Gram matrix is channels**2 floats)
        scaled = act.scaled(s)
        for lin, w in zip(linears, values):
            # W[:, j] * s[j], computed when it is read (core/weights.py): no migrated copy of every weight held
            old = lin.args[1]
            new = weights.derive(gm, ir.aten.mul.Tensor, old, [s.to(w.dtype)], "migrated", self.name, lin)
            lin.update_arg(1, new)
            weights.drop(gm, old)
            lin.meta[ir.CALIB] = scaled
