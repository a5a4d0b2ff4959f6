"""split-channels: MergeQuant's dimensional reconstruction: split a linear input's widest channels.

One static per-tensor step must cover the activation's widest channel. Splitting channel c into m
copies of x_c / m, with W[:, c] duplicated m times in every reading linear, computes the same
product with c's range divided by m, so the step can shrink to the next channel's range
(`qcompile/algorithms/split_channels.py`). For each group of linears reading one activation, the
number of channels split and their copies are chosen by the group's quantized output error on
the calibration samples, with at most `budget` extra channels (0, the default: the pass changes
nothing). The split is one gather at run time, before the quantize (Inductor fuses it into the
loop that quantizes); its `1 / copies` multiply sits right after the activation's producer, where
fold-scales folds it into a norm's weight or a producing linear's rows.

Before:
    norm = aten.mul(w_norm, h)                                  # f32[576]
    q = aten.linear(norm, w_q); k = aten.linear(norm, w_k)
After (budget=8: two channels split into 3 and 2 copies, 3 extra):
    norm = aten.mul(w_norm, h)
    scaled = aten.mul(norm, model_layers_0_self_attn_q_proj_split_multiplier)   # 1 / copies
    split = aten.index_select(scaled, -1, model_layers_0_self_attn_q_proj_split_index)   # 576 -> 579
    q = aten.linear(split, w_q_split); k = aten.linear(split, w_k_split)       # W[:, index]

Calibration statistics follow (`ChannelStats.split`): ranges, samples and the Gram matrix are
those of the split activation, so GPTQ and the clip search see what the kernel will. Run it
after migrate-scales (it splits what migration leaves widest) and, with `rotated=true`, measure
its candidates as rotate-inputs will leave them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompile.algorithms import split_channels
from qcompile.core import ir, weights
from qcompile.core.analysis import ActivationGroups, get_analysis
from qcompile.core.memo import memoized
from qcompile.core.pass_api import PassResult, PipelineError, QPass, option, register_pass
from qcompile.core.select import LinearFilter


@dataclass(frozen=True)
class SplitChannelsOptions:
    budget: int = option(0, help="the most input channels a group of linears may gain (0: split nothing)")
    w_bits: int = option(4, choices=(4, 8), help="weight bits of the error the choice minimizes")
    a_bits: int = option(4, choices=(4, 8), help="activation bits of the error the choice minimizes")
    rotated: bool = option(False, help="measure candidates as rotate-inputs will leave them (split input and "
                                       "weights rotated by the fixed factors)")
    skip: str = option("lm_head", help="regex on the module path of linears whose input is not split")

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise PipelineError(f"split-channels: budget must be >= 0 (0: split nothing), got {self.budget}")


@register_pass
class SplitChannels(QPass):
    name = "split-channels"
    summary = ("MergeQuant's dimensional reconstruction: split the widest input channels of a group of linears "
               "into copies (weight columns duplicated), as many as the output error asks, within a budget.")
    Options = SplitChannelsOptions
    statistics = ("groups-split", "linears-split", "channels-added")
    after = {"migrate-scales": "it splits the channels that migration leaves widest"}
    before = {
        "fold-scales": "the 1 / copies multiply it puts after the producer folds into a norm or linear there",
        "rotate-inputs": "a split after the rotation would split rotated channels, which are already flat",
        "insert-quantizers": "the quantizers must see the split activation",
    }

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.options.budget == 0:
            return PassResult(gm, False)
        linears = LinearFilter(skip=self.options.skip)
        groups = get_analysis(gm, ActivationGroups).select(lambda lin: ir.CALIB in lin.meta and linears.takes(lin))
        modified = False
        for activation, linears in self.progress(groups.items(), "group"):
            self.current_node = activation
            split = self._choose(gm, linears)
            if split.extra:
                self._split(gm, activation, linears, split)
                self.count("groups-split")
                self.count("linears-split", len(linears))
                self.count("channels-added", split.extra)
                modified = True
        if modified:
            gm.graph.eliminate_dead_code()  # the unsplit weights
            ir.delete_unused_constants(gm)
            gm.recompile()
        return PassResult(gm, modified)

    def _choose(self, gm: fx.GraphModule, linears: list[fx.Node]) -> split_channels.ChannelSplit:
        o = self.options
        stats = linears[0].meta[ir.CALIB]
        values = [weights.value(gm, lin.args[1]) for lin in linears]
        name = str(linears[0].args[1].meta.get(ir.FQN, linears[0].name))

        def run() -> tuple:
            s = split_channels.choose_split(stats.samples, values, stats.absmax, o.budget, o.w_bits, o.a_bits,
                                            o.rotated)
            return s.index, s.multiplier, s.error, s.error_unsplit

        index, multiplier, error, unsplit = memoized(
            gm, "split-channels", name, (stats.samples, stats.absmax, *values, o.budget, o.w_bits, o.a_bits, o.rotated),
            run)
        return split_channels.ChannelSplit(index, multiplier, float(error), float(unsplit))

    def _split(self, gm: fx.GraphModule, activation: fx.Node, linears: list[fx.Node],
               split: split_channels.ChannelSplit) -> None:
        graph = gm.graph
        stem = f"{ir.module_path(linears[0]) or linears[0].name}_split"
        dtype = ir.fake_value(activation).dtype
        with graph.inserting_before(linears[0]):
            multiplier = graph.get_attr(ir.add_constant(gm, f"{stem}_multiplier", split.multiplier.to(dtype)))
            index = graph.get_attr(ir.add_constant(gm, f"{stem}_index", split.index))
            scaled = graph.call_function(ir.aten.mul.Tensor, (activation, multiplier))
            gathered = graph.call_function(ir.aten.index_select.default, (scaled, -1, index))
        for node in (multiplier, index, scaled, gathered):
            ir.mark_created(node, self.name, linears)
        stats = linears[0].meta[ir.CALIB].split(split.index, split.multiplier)
        for lin in linears:
            old = lin.args[1]
            weight = weights.value(gm, old)  # the new shape is a constant of its own, not an expression
            with graph.inserting_before(lin):
                new = graph.get_attr(ir.add_constant(gm, f"{old.meta.get(ir.FQN, old.name)}_split",
                                                     split.weight(weight).contiguous()))
            del weight
            ir.mark_created(new, self.name, [old])
            lin.update_arg(0, gathered)
            lin.update_arg(1, new)
            weights.drop(gm, old)  # the unsplit weight and its expression: freed now
            lin.meta[ir.CALIB] = stats
            lin.meta.pop(ir.ACT_CLIP, None)  # a clip chosen for the unsplit input no longer applies
            lin.meta[ir.SPLIT] = split.extra
