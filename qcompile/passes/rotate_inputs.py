"""rotate-inputs: rotate each quantized linear's input by a fixed orthogonal matrix, and its weight.

    y = x W^T = (x R)(W R)^T        for any orthogonal R

With R Hadamard-like (`qcompile/kernels/rotation.py`: a Kronecker product of small orthogonal factors), an
outlier channel of x is spread evenly over all channels of x R, so one static per-tensor step fits
the rotated activation far better (QuaRot, SpinQuant); the weight's rows are flattened the same
way. On SmolLM2-135M, rotating down_proj's input raises its 4-bit output SQNR from 4-10 dB (the
best migration) to 12-19 dB. The rotation of x runs at run time (one `q4.rotate` node, shared by
the linears that read the same activation: q/k/v, gate/up); the rotation of W is a weight
expression (`q4.rotate_weight` over the same factors, core/weights.py): computed when a pass reads
the weight, rounded by insert-quantizers, folded into a constant if the linear stays in float. It
needs no structure around the linear, so it also serves activations that migration must leave
alone (BERT's post-norm residual, inputs without an affine producer).

Before:
    q = aten.linear(h, w_q); k = aten.linear(h, w_k)
After:
    h_rot = q4.rotate(h, [rotation_576_0, rotation_576_1, rotation_576_2])   # h @ R
    w_q_rot = q4.rotate_weight(w_q, [rotation_576_0, ...])                   # W @ R
    w_k_rot = q4.rotate_weight(w_k, [rotation_576_0, ...])
    q = aten.linear(h_rot, w_q_rot); k = aten.linear(h_rot, w_k_rot)

Calibration statistics follow: the samples and the Gram matrix are rotated exactly; per-channel
ranges of the rotated activation are taken from the rotated samples (the full calibration set was
only observed unrotated). A clipping ratio chosen before rotation no longer applies and is dropped,
so insert-quantizers{search-clip=true} searches it again on the rotated samples.

`learn-steps=N` learns each group's factors instead (`algorithms/learn_rotation.py`: N steps of
gradient descent on the group's quantized output error at `w-bits`/`a-bits`, from the fixed
factors, kept orthogonal). The learned factors are the group's own constants, and the op is
flagged `hadamard=False` (no Walsh-Hadamard shortcut at run time). A group whose learned factors
do not lower the error on held-out samples keeps the fixed ones; each linear's meta says which
(`q4_rotation`: "hadamard", "learned", or "hadamard (learned was worse)"), and explain shows it:

    h_rot = q4.rotate(h, [model_layers_3_self_attn_q_proj_rotation_0, ...], hadamard=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.algorithms import learn_rotation
from qcompile.core import ir, weights
from qcompile.core.analysis import ActivationGroups, get_analysis
from qcompile.core.memo import memoized
from qcompile.core.pass_api import PassResult, PipelineError, QPass, option, register_pass
from qcompile.core.select import LinearFilter
from qcompile.kernels import rotation

q4 = torch.ops.q4


@dataclass(frozen=True)
class RotateInputsOptions:
    skip: str = option("lm_head", help="regex on the module path of linears whose input is not rotated")
    learn_steps: int = option(0, help="learn each group's orthogonal factors by this many gradient steps on its "
                                      "quantized output error (0: the fixed Hadamard-like factors)")
    learn_rate: float = option(0.01, help="learn-steps: the Adam learning rate")
    learn_skip: str = option("", help="learn-steps: regex on the module path of linears whose group keeps the fixed "
                                      "factors (to spend the learning time where it pays)")
    w_bits: int = option(4, choices=(4, 8), help="learn-steps: weight bits of the error it minimizes")
    a_bits: int = option(4, choices=(4, 8), help="learn-steps: activation bits of the error it minimizes")

    def __post_init__(self) -> None:
        if self.learn_steps < 0:
            raise PipelineError(f"rotate-inputs: learn-steps must be >= 0 (0: fixed rotations), got {self.learn_steps}")
        if not self.learn_rate > 0:
            raise PipelineError(f"rotate-inputs: learn-rate must be > 0, got {self.learn_rate}")


@register_pass
class RotateInputs(QPass):
    name = "rotate-inputs"
    summary = ("Rotate quantized linears' inputs (at run time) and weights (an expression) by a Hadamard-like orthogonal matrix, "
               "or one learned for each layer.")
    Options = RotateInputsOptions
    statistics = ("groups-rotated", "linears-rotated", "rotations-learned", "learned-rotations-worse")

    def call(self, gm: fx.GraphModule) -> PassResult:
        linears = LinearFilter(skip=self.options.skip)
        learn_skip = LinearFilter(skip=self.options.learn_skip)
        groups = get_analysis(gm, ActivationGroups).select(lambda lin: ir.CALIB in lin.meta and linears.takes(lin))
        factor_nodes: dict[int, list[fx.Node]] = {}
        for activation, linears in self.progress(groups.items(), "group"):
            self.current_node = activation
            n = weights.shape_and_dtype(gm, linears[0].args[1])[0][1]
            activations = ir.fake_value(activation)  # the factors live where the activations do (a GPU)
            device = activations.device if activations is not None else torch.device("cpu")
            factors = [f.to(device) for f in rotation.rotation_factors(n)]
            how = "hadamard"
            if self.options.learn_steps and not any(learn_skip.skips(lin) for lin in linears):
                learned, how = self._learn(gm, linears, factors)
                if how == "learned":
                    stem = f"{ir.module_path(linears[0]) or linears[0].name}_rotation"
                    self._rotate(gm, activation, linears, learned, self._factor_constants(gm, stem, learned, linears[0]),
                                 hadamard=False)
            if how != "learned":
                if n not in factor_nodes:
                    factor_nodes[n] = self._factor_constants(gm, f"rotation_{n}", factors, linears[0])
                self._rotate(gm, activation, linears, factors, factor_nodes[n])
            for lin in linears:
                lin.meta[ir.ROTATION] = how
            self.count("groups-rotated")
            self.count("linears-rotated", len(linears))
        if groups:
            gm.graph.eliminate_dead_code()  # the weights before rotation: once, not per group
            ir.delete_unused_constants(gm)
            gm.recompile()
        return PassResult(gm, bool(groups))

    def _learn(self, gm: fx.GraphModule, linears: list[fx.Node],
               factors: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
        """The group's learned factors, and what its linears run with ("learned" or why not)."""
        o = self.options
        values = [weights.value(gm, lin.args[1]) for lin in linears]
        samples = linears[0].meta[ir.CALIB].samples
        name = str(linears[0].args[1].meta.get(ir.FQN, linears[0].name))

        def run() -> tuple:
            result = learn_rotation.learn_rotation(samples, values, factors, o.learn_steps, o.w_bits, o.a_bits,
                                                   o.learn_rate)
            return (*result.factors, float(result.learned))

        *learned, kept = memoized(gm, "learn-rotation", name,
                                  (samples, *values, o.learn_steps, o.learn_rate, o.w_bits, o.a_bits), run)
        if not float(kept):
            self.count("learned-rotations-worse")
            return factors, "hadamard (learned was worse)"
        self.count("rotations-learned")
        return list(learned), "learned"

    def _factor_constants(self, gm: fx.GraphModule, stem: str, factors: list[torch.Tensor],
                          source: fx.Node) -> list[fx.Node]:
        """get_attr nodes of the factors `{stem}_{i}`, placed after the graph's inputs (the fixed
        ones are shared by every group of their width)."""
        first = next(node for node in gm.graph.nodes if node.op != "placeholder")
        nodes = []
        with gm.graph.inserting_before(first):
            for i, f in enumerate(factors):
                node = gm.graph.get_attr(ir.add_constant(gm, f"{stem}_{i}", f))
                nodes.append(ir.mark_created(node, self.name, [source]))
        return nodes

    def _rotate(self, gm: fx.GraphModule, activation: fx.Node, linears: list[fx.Node],
                factors: list[torch.Tensor], factor_nodes: list[fx.Node], hadamard: bool = True) -> None:
        graph = gm.graph
        stats = linears[0].meta[ir.CALIB].rotated(factors, hadamard)
        with graph.inserting_before(linears[0]):
            rotated = graph.call_function(q4.rotate.default, (activation, factor_nodes),
                                          {} if hadamard else {"hadamard": False})
        ir.mark_created(rotated, self.name, linears)
        for lin in linears:
            # W @ R, computed when it is read (core/weights.py): no rotated copy of every weight held
            new = weights.derive(gm, q4.rotate_weight.default, lin.args[1], [factor_nodes, hadamard], "rotated",
                                 self.name, lin)
            lin.update_arg(0, rotated)
            lin.update_arg(1, new)
            lin.meta[ir.CALIB] = stats
            lin.meta.pop(ir.ACT_CLIP, None)
