"""ChannelStats: the statistics calibration records for the activation a linear reads.

Calibration (`qcompile.frontend.calibrate`) fills one per observed linear and puts it in the
node's meta (`ir.CALIB`, `q4_calib`); the passes and the algorithms read it from there, and the
saved artifact stores it. It lives here, below the passes, so that they can name the type.
"""

from __future__ import annotations

import dataclasses
import math

import torch

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
    """

    absmax: torch.Tensor  # float32 [channels]
    robust: torch.Tensor  # float32 [channels]
    samples: torch.Tensor  # float32 [<= SAMPLE_ROWS, channels]
    num_tokens: int = 0
    # sum of x^T x over all tokens, float32 [channels, channels]; only when a pass needs it
    # (GPTQ weight rounding), as it costs channels**2 floats per linear
    gram: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        flat = rows.abs()
        self.absmax = torch.maximum(self.absmax, flat.amax(dim=0))
        k = max(1, math.ceil(ROBUST_QUANTILE * flat.shape[0]))
        self.robust = torch.maximum(self.robust, flat.kthvalue(k, dim=0).values)
        self._sample(rows)
        if self.gram is not None:
            self.gram.addmm_(rows.t(), rows)
        self.num_tokens += flat.shape[0]

    def _sample(self, rows: torch.Tensor) -> None:
        """Keep a uniform sample of all rows seen: each new row replaces a kept one with
        probability SAMPLE_ROWS / (rows seen so far), as in reservoir sampling."""
        g = torch.Generator().manual_seed(self.num_tokens)
        seen = self.num_tokens + torch.arange(1, rows.shape[0] + 1)
        keep = torch.rand(rows.shape[0], generator=g) * seen < SAMPLE_ROWS
        chosen = rows[keep]
        free = SAMPLE_ROWS - self.samples.shape[0]
        self.samples = torch.cat([self.samples, chosen[:free]])
        replace = chosen[free:][-SAMPLE_ROWS:]
        if replace.shape[0]:
            slots = torch.randperm(SAMPLE_ROWS, generator=g)[: replace.shape[0]]
            self.samples[slots] = replace

    @classmethod
    def empty(cls, channels: int, gram: bool = False) -> ChannelStats:
        zeros = torch.zeros(channels, dtype=torch.float32)
        return cls(absmax=zeros, robust=zeros.clone(), samples=torch.zeros(0, channels),
                   gram=torch.zeros(channels, channels) if gram else None)

    def rotated(self, factors: list[torch.Tensor], hadamard: bool = True) -> ChannelStats:
        """The statistics of x @ R, R = kron(*factors) orthogonal (`qcompile/kernels/rotation.py`). Samples
        and the Gram matrix (R^T G R) rotate exactly; per-channel ranges come from the rotated
        samples, as the full calibration set was only observed unrotated."""
        samples = rotate(self.samples, factors, hadamard) if self.samples.shape[0] else self.samples
        if samples.shape[0]:
            flat = samples.abs()
            absmax = flat.amax(dim=0)
            robust = flat.kthvalue(max(1, math.ceil(ROBUST_QUANTILE * flat.shape[0])), dim=0).values
        else:
            absmax, robust = self.absmax, self.robust
        gram = None if self.gram is None else \
            rotate(rotate(self.gram, factors, hadamard).t().contiguous(), factors, hadamard).t()
        return dataclasses.replace(self, absmax=absmax, robust=robust, samples=samples, gram=gram)

    def split(self, index: torch.Tensor, multiplier: torch.Tensor) -> ChannelStats:
        """The statistics of (x * multiplier)[..., index], as split-channels leaves the input: each
        channel's range times its multiplier, gathered; the Gram matrix gathered on both sides."""
        gram = None
        if self.gram is not None:
            gram = (self.gram * torch.outer(multiplier, multiplier))[index][:, index]
        return dataclasses.replace(self, absmax=(self.absmax * multiplier)[index], robust=(self.robust * multiplier)[index],
                                   samples=(self.samples * multiplier)[:, index], gram=gram)

    def scaled(self, scales: torch.Tensor) -> ChannelStats:
        """The statistics of x / scales (per channel), as a migration leaves the input."""
        gram = None if self.gram is None else self.gram / torch.outer(scales, scales)
        return dataclasses.replace(self, absmax=self.absmax / scales, robust=self.robust / scales,
                                   samples=self.samples / scales, gram=gram)
