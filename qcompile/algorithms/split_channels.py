"""Channel splitting: MergeQuant's dimensional reconstruction, chosen by a layer's output error.

A static per-tensor activation step must cover the largest channel; a channel c with a range far
above the others wastes the 4-bit grid on every other channel. Splitting c into m copies of
x_c / m (the weight column W[:, c] duplicated m times) computes the same product,

    sum over the m copies of (x_c / m) * W[:, c] = x_c * W[:, c],

with c's range divided by m: the per-tensor step can shrink to the next channel's range. The
cost is m - 1 more input channels for the GEMM (and a gather before the quantize).

`choose_split` tries split targets t (the top channels' ranges, and the smallest t the budget of
extra channels allows), splits every channel above t into ceil(range / t) copies, and keeps the
candidate (or no split) with the lowest quantized output error of the group's linears on the
calibration samples, with the activation clipping ratio searched for each. An activation of zeros
or without finite ranges is never split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from qcompile.algorithms.scale_search import fake_quant_activation, fake_quant_weight
from qcompile.kernels.rotation import rotate, rotation_factors

# Clipping ratios tried for each candidate (a coarser grid than the clip search of
# insert-quantizers, which searches the chosen split's clip again on the full grid).
SPLIT_CLIPS = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)
# How many top channels a candidate target splits (the target is the next channel's range).
TOP_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclasses.dataclass(frozen=True)
class ChannelSplit:
    """x [..., K] -> (x * multiplier)[..., index]: the split input, K + extra channels wide.

    `index` [K + extra] (int64) names each new channel's source channel; a split channel's
    copies follow the K original positions, so the first K entries are 0..K-1. `multiplier` [K]
    (float32) is 1 / copies of each source channel (1: not split). `error` and `error_unsplit`
    are the chosen candidate's output error and that of no split (equal when none helped).
    """

    index: torch.Tensor
    multiplier: torch.Tensor
    error: float
    error_unsplit: float

    @property
    def extra(self) -> int:
        return self.index.numel() - self.multiplier.numel()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The split activation (x * multiplier)[..., index]."""
        return (x * self.multiplier.to(x.device, x.dtype)).index_select(-1, self.index.to(x.device))

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """A reading linear's weight [N, K] -> [N, K + extra]: each split column duplicated."""
        return w.index_select(1, self.index.to(w.device))


def no_split(channels: int, error: float = 0.0) -> ChannelSplit:
    return ChannelSplit(torch.arange(channels), torch.ones(channels), error, error)


def copies_for(absmax: torch.Tensor, target: float) -> torch.Tensor:
    """ceil(range / target) copies of each channel above `target` (1 for the others)."""
    return torch.clamp(torch.ceil(absmax / target), min=1).to(torch.int64)


def extra_channels(absmax: torch.Tensor, target: float) -> int:
    """How many channels splitting at `target` adds: sum(ceil(a_c / t) - 1), falling as t grows."""
    return int((copies_for(absmax, target) - 1).sum())


def split_for(copies: torch.Tensor, error: float, error_unsplit: float) -> ChannelSplit:
    """The split that gives channel c `copies[c]` copies (extra copies appended in channel order)."""
    channels = copies.numel()
    every = torch.arange(channels, device=copies.device)
    index = torch.cat([every, every.repeat_interleave(copies - 1)])
    return ChannelSplit(index, 1.0 / copies.float(), error, error_unsplit)


def budget_target(absmax: torch.Tensor, budget: int) -> float:
    """The smallest split target whose extra channels fit in `budget` (bisection on
    `extra_channels`, which falls as the target grows)."""
    top = absmax.max().item()
    low, high = 0.0, top  # extra(high) = 0 <= budget; find the least t with extra(t) <= budget
    for _ in range(40):
        mid = (low + high) / 2
        if mid <= 0 or extra_channels(absmax, mid) > budget:
            low = mid
        else:
            high = mid
    return high


def candidate_targets(absmax: torch.Tensor, budget: int) -> list[float]:
    """Split targets to try, largest first: the ranges of the channels after the top 1, 2, 3, 4,
    6, ... and the smallest target the budget allows; none below that, so each fits the budget."""
    ranges = absmax.sort(descending=True).values
    floor = budget_target(absmax, budget)
    targets = [ranges[k].item() for k in TOP_COUNTS if k < ranges.numel() and ranges[k].item() >= floor]
    targets.append(floor)
    return sorted({t for t in targets if t > 0 and t < ranges[0].item()}, reverse=True)


def choose_split(x: torch.Tensor, weights: Sequence[torch.Tensor], absmax: torch.Tensor, budget: int,
                 w_bits: int, a_bits: int, rotated: bool = False) -> ChannelSplit:
    """The split of x's channels (at most `budget` extra) with the lowest quantized output error.

    x [samples, K]: calibration token rows of the activation; weights: the linears reading it;
    absmax [K]: each channel's range over all calibration tokens. With `rotated`, errors are
    measured as rotate-inputs leaves the linears (the split input and weights rotated by the
    fixed factors of their new width).
    """
    channels = x.shape[-1]
    if budget <= 0 or x.shape[0] == 0 or not torch.isfinite(absmax).all() or not absmax.max() > 0:
        return no_split(channels)
    x = x.float()
    weights = [w.float() for w in weights]
    references = [x @ w.t() for w in weights]

    def error(split: ChannelSplit) -> float:
        """The output error at the best clip of SPLIT_CLIPS; each weight rounded once."""
        xs = split.apply(x)
        rotation = [f.to(x.device) for f in rotation_factors(xs.shape[-1])] if rotated else None
        ws = [split.weight(w) for w in weights]
        if rotation is not None:
            xs, ws = rotate(xs, rotation), [rotate(w, rotation) for w in ws]
        ws = [fake_quant_weight(w, w_bits) for w in ws]
        top = xs.abs().max().item()
        return min(sum((ref - fake_quant_activation(xs, top, clip, a_bits) @ w.t()).pow(2).sum().item()
                       for ref, w in zip(references, ws)) for clip in SPLIT_CLIPS)

    unsplit = error(no_split(channels))
    best = no_split(channels, unsplit)
    for target in candidate_targets(absmax, budget):
        candidate = split_for(copies_for(absmax, target), math.nan, unsplit)
        candidate = dataclasses.replace(candidate, error=error(candidate))
        if candidate.error < best.error:
            best = candidate
    return best
