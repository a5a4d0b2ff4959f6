"""ChannelStats: the statistics calibration records for the activation a linear reads.

Calibration (`qcompile.frontend.calibrate`) fills one per observed linear and puts it in the
node's meta (`ir.CALIB`, `q4_calib`); the passes and the algorithms read it from there, and the
saved artifact stores it. It lives here, below the passes, so that they can name the type.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from qcompile.core.memory import SpilledTensor, TensorFile
from qcompile.kernels.rotation import rotate

# The robust range of a channel: this quantile of |x| over the tokens of a batch (99%: with
# 512-token batches a 99.9% quantile would be the max itself). An outlier
# channel stands out in absmax *and* in this percentile; a single spike only in absmax.
ROBUST_QUANTILE = 0.99
# Token rows kept per activation (a uniform sample over all calibration tokens): passes that
# search scales or clipping measure a layer's output error on them.
SAMPLE_ROWS = 256


@dataclasses.dataclass
class ChannelStats:
    """Statistics of one activation tensor, per channel of its last dimension.

    `absmax` is the max of |x| over all tokens; `robust` the max over batches of the per-batch
    99th percentile of |x| (a spike in a few tokens does not move it); `samples` up to
    SAMPLE_ROWS token rows drawn uniformly from all tokens seen (reservoir sampling, seeded).

    Attention sinks: the first token of every sequence (row 0 along x's sequence dim, for x of
    3 or more dims [..., tokens, channels]; calibration runs whole sequences from their start)
    is kept apart as well: `sinks` holds those rows (the first SAMPLE_ROWS of them) and
    `rest_absmax` the max of |x| over the other tokens. In SmolLM2 the first token's down_proj
    input reaches 3210 where the others stay under 17 (layer 11): a quantizer that gives it a
    step of its own (`insert-quantizers{sinks=true}`) steps the rest by `rest_absmax`.
    """

    absmax: torch.Tensor  # float32 [channels]
    robust: torch.Tensor  # float32 [channels]
    # the sampled rows as calibration saw them (`samples`: as this activation has them)
    observed_samples: torch.Tensor  # float32 [<= SAMPLE_ROWS, observed channels]
    num_tokens: int = 0
    # sum of x^T x over all tokens of the observed activation, float32, its upper triangle row by
    # row [channels (channels + 1) / 2] (`pack_gram`; or given whole, [channels, channels]); only
    # when a pass needs it (GPTQ weight rounding), as it costs channels**2 / 2 floats per
    # activation; in a temporary file once calibration is over (`spill_gram`)
    observed_gram: torch.Tensor | SpilledTensor | None = None
    sinks: torch.Tensor | None = None  # float32 [<= SAMPLE_ROWS, channels]; None: not observed
    rest_absmax: torch.Tensor | None = None  # float32 [channels]; None: not observed
    # How this activation derives from the observed one (migrated, rotated, split), as steps
    # applied to `observed_samples` and `observed_gram` when `samples` and `gram` are read: a
    # pass that transforms the statistics of every linear makes no second copy of every Gram
    # matrix (SmolLM2: ~400 MB a copy) nor of every sample (~100 MB a copy).
    steps: tuple = ()

    @property
    def samples(self) -> torch.Tensor:
        """Up to SAMPLE_ROWS token rows of this activation, float32 [rows, channels]: the observed
        ones through `steps`, computed at each read when the activation was transformed."""
        rows = self.observed_samples
        for step, *args in self.steps:
            rows = _ROWS_STEPS[step](rows, *args)
        return rows

    @property
    def gram(self) -> torch.Tensor | None:
        """Sum of x^T x over all tokens of this activation, float32 [channels, channels]; None
        unless calibration kept it. Computed from `observed_gram` at each read when the
        activation was transformed: read it once and drop it when done."""
        gram = self.observed_gram
        if gram is None:
            return None
        if isinstance(gram, SpilledTensor):
            gram = gram.load()
        if gram.dim() == 1:  # packed (`pack_gram`)
            gram = _unpacked_gram(gram)
        for step, *args in self.steps:
            gram = _GRAM_STEPS[step](gram, *args)
        return gram

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.absmax.device != x.device:  # made elsewhere: kept where the activations are
            self.move_to(x.device)
        channels = x.shape[-1]
        rows = x.reshape(-1, channels).float()
        flat = rows.abs()
        # [..., tokens, channels]: each sequence's first row apart from the rest (the sinks)
        sequences = x.dim() >= 3 and x.shape[-2] > 0
        first = x[..., 0, :].reshape(-1, channels).float() if sequences else rows[:0]
        rest = x[..., 1:, :].reshape(-1, channels).float() if sequences else rows
        self._update_sinks(first, rest)
        self.absmax = torch.maximum(self.absmax, flat.amax(dim=0))
        k = max(1, math.ceil(ROBUST_QUANTILE * flat.shape[0]))
        self.robust = torch.maximum(self.robust, flat.kthvalue(k, dim=0).values)
        # samples stand for the tokens a per-tensor step serves: not the sinks, which `sinks` keeps
        self._sample(rest if rest.shape[0] else rows)
        if self.observed_gram is not None:
            if isinstance(self.observed_gram, SpilledTensor):
                raise ValueError("qcompile: these statistics' Gram matrix was spilled to a file (calibration "
                                 "was over); a new calibration makes new statistics")
            if self.observed_gram.dim() == 1:  # packed: the batch's upper triangle added
                self.observed_gram += (rows.t() @ rows).view(-1)[_upper_index(channels)]
            else:
                self.observed_gram.addmm_(rows.t(), rows)
        self.num_tokens += flat.shape[0]

    def move_to(self, device: torch.device) -> None:
        """Every statistic onto `device` (the activations'), in place: a model on a GPU calibrates
        there, and the steps and constants the passes derive from them are made there."""
        self.absmax, self.robust = self.absmax.to(device), self.robust.to(device)
        self.observed_samples = self.observed_samples.to(device)
        if isinstance(self.observed_gram, torch.Tensor):
            self.observed_gram = self.observed_gram.to(device)
        if self.sinks is not None:
            self.sinks, self.rest_absmax = self.sinks.to(device), self.rest_absmax.to(device)

    def _update_sinks(self, first: torch.Tensor, rest: torch.Tensor) -> None:
        """The sequences' first rows into `sinks`, the max of the other rows into `rest_absmax`."""
        if self.sinks is None:
            self.sinks = torch.zeros(0, rest.shape[-1], device=rest.device)
            self.rest_absmax = torch.zeros(rest.shape[-1], device=rest.device)
        self.sinks = torch.cat([self.sinks, first[: SAMPLE_ROWS - self.sinks.shape[0]]])
        if rest.shape[0]:
            self.rest_absmax = torch.maximum(self.rest_absmax, rest.abs().amax(dim=0))

    def _sample(self, rows: torch.Tensor) -> None:
        """Keep a uniform sample of all rows seen: each new row replaces a kept one with
        probability SAMPLE_ROWS / (rows seen so far), as in reservoir sampling."""
        g = torch.Generator().manual_seed(self.num_tokens)
        seen = self.num_tokens + torch.arange(1, rows.shape[0] + 1)
        keep = torch.rand(rows.shape[0], generator=g) * seen < SAMPLE_ROWS
        chosen = rows[keep]
        free = SAMPLE_ROWS - self.observed_samples.shape[0]
        self.observed_samples = torch.cat([self.observed_samples, chosen[:free]])
        replace = chosen[free:][-SAMPLE_ROWS:]
        if replace.shape[0]:
            slots = torch.randperm(SAMPLE_ROWS, generator=g)[: replace.shape[0]]
            self.observed_samples[slots] = replace

    def pack_gram(self) -> None:
        """Keep a whole Gram matrix (one given whole) as its upper triangle, row by row, as
        calibration accumulates it: it is symmetric, so statistics hold half the bytes (SmolLM2:
        385 -> 195 MiB, all through quantization); `gram` unpacks it at each read. In place, for
        every linear sharing these statistics."""
        g = self.observed_gram
        if isinstance(g, torch.Tensor) and g.dim() == 2:
            self.observed_gram = g.reshape(-1)[_upper_index(g.shape[0])]

    def spill_gram(self, file: TensorFile) -> None:
        """Keep the Gram matrix (packed) in `file` from now on: `gram` reads it back at each read.
        GPTQ reads it once per linear, and a recompile only when it misses GPTQ's memoized
        results, while in memory it sat under every later pass and call (SmolLM2-135M: 195 MiB;
        `bench memory`'s peak, the head's GPTQ, 1781 -> 1555 MiB resident, now calibration's).
        In place, for every linear sharing these statistics; a second call does nothing."""
        if isinstance(self.observed_gram, torch.Tensor):
            self.pack_gram()
            self.observed_gram = file.spill(self.observed_gram)

    @classmethod
    def empty(cls, channels: int, gram: bool = False, device: torch.device | None = None) -> ChannelStats:
        """No token seen yet; with a Gram matrix (packed) if `gram`; on `device` (the activations')."""
        zeros = torch.zeros(channels, dtype=torch.float32, device=device)
        return cls(absmax=zeros, robust=zeros.clone(), observed_samples=torch.zeros(0, channels, device=device),
                   observed_gram=torch.zeros(channels * (channels + 1) // 2, device=device) if gram else None)

    @property
    def sink_absmax(self) -> torch.Tensor | None:
        """Per channel, the max of |x| over the sequences' first rows; None if none was seen."""
        return None if self.sinks is None or not self.sinks.shape[0] else self.sinks.abs().amax(dim=0)

    def rotated(self, factors: list[torch.Tensor], hadamard: bool = True) -> ChannelStats:
        """The statistics of x @ R, R = kron(*factors) orthogonal (`qcompile/kernels/rotation.py`). Samples
        and the Gram matrix (R^T G R) rotate exactly; per-channel ranges come from the rotated
        samples, as the full calibration set was only observed unrotated."""
        steps = self.steps + (("rotate", tuple(factors), hadamard),)
        samples = dataclasses.replace(self, steps=steps).samples  # the rotated rows, for the ranges only
        if samples.shape[0]:
            flat = samples.abs()
            absmax = flat.amax(dim=0)
            robust = flat.kthvalue(max(1, math.ceil(ROBUST_QUANTILE * flat.shape[0])), dim=0).values
        else:
            absmax, robust = self.absmax, self.robust
        sinks = self.sinks
        if sinks is not None and sinks.shape[0]:
            sinks = rotate(sinks, factors, hadamard)
        # the rest's range, like absmax, from the rotated samples (which hold no first row)
        rest = None if self.rest_absmax is None else absmax if samples.shape[0] else self.rest_absmax
        return dataclasses.replace(self, absmax=absmax, robust=robust, sinks=sinks, rest_absmax=rest, steps=steps)

    def split(self, index: torch.Tensor, multiplier: torch.Tensor) -> ChannelStats:
        """The statistics of (x * multiplier)[..., index], as split-channels leaves the input: each
        channel's range times its multiplier, gathered; the Gram matrix gathered on both sides."""
        return dataclasses.replace(self, absmax=(self.absmax * multiplier)[index], robust=(self.robust * multiplier)[index],
                                   steps=self.steps + (("split", index, multiplier),),
                                   sinks=None if self.sinks is None else (self.sinks * multiplier)[:, index],
                                   rest_absmax=None if self.rest_absmax is None else (self.rest_absmax * multiplier)[index])

    def scaled(self, scales: torch.Tensor) -> ChannelStats:
        """The statistics of x / scales (per channel), as a migration leaves the input."""
        return dataclasses.replace(self, absmax=self.absmax / scales, robust=self.robust / scales,
                                   steps=self.steps + (("scale", scales),),
                                   sinks=None if self.sinks is None else self.sinks / scales,
                                   rest_absmax=None if self.rest_absmax is None else self.rest_absmax / scales)


@functools.lru_cache(maxsize=8)
def _upper_index(n: int) -> torch.Tensor:
    """Where the upper triangle of an [n, n] matrix lies in its flat view, row by row (int64
    [n (n + 1) / 2]: 9 MiB at n = 1536; kept, as every batch of calibration adds one)."""
    rows, cols = torch.triu_indices(n, n)
    return rows * n + cols


def _unpacked_gram(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric [n, n] matrix whose upper triangle, row by row, is `upper`."""
    n = (math.isqrt(8 * upper.numel() + 1) - 1) // 2
    rows, cols = torch.triu_indices(n, n, device=upper.device)
    gram = torch.empty(n, n, dtype=upper.dtype, device=upper.device)
    gram[rows, cols] = upper
    gram[cols, rows] = upper
    return gram


def _rotated_gram(gram: torch.Tensor, factors: tuple[torch.Tensor, ...], hadamard: bool) -> torch.Tensor:
    """R^T G R of x @ R, R = kron(*factors)."""
    factors = list(factors)
    return rotate(rotate(gram, factors, hadamard).t().contiguous(), factors, hadamard).t()


def _split_gram(gram: torch.Tensor, index: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of (x * multiplier)[..., index]: scaled and gathered on both sides."""
    return (gram * torch.outer(multiplier, multiplier))[index][:, index]


def _scaled_gram(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of x / scales."""
    return gram / torch.outer(scales, scales)


_GRAM_STEPS = {"rotate": _rotated_gram, "split": _split_gram, "scale": _scaled_gram}
# the same steps on token rows [rows, channels]
_ROWS_STEPS = {
    "rotate": lambda rows, factors, hadamard: rotate(rows, list(factors), hadamard) if rows.shape[0] else rows,
    "split": lambda rows, index, multiplier: (rows * multiplier)[:, index],
    "scale": lambda rows, scales: rows / scales,
}
