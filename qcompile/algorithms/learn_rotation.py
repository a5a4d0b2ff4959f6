"""Learning a layer's rotation: orthogonal Kronecker factors fitted to its quantized output error.

rotate-inputs multiplies a linear's input by R = kron(F_1, ..., F_r) at run time and folds R into
the weight; any orthogonal R leaves the float layer unchanged. A fixed Hadamard-like R spreads
outliers evenly, but it knows nothing of the layer. As SpinQuant (learned rotations) and
FlatQuant (learned Kronecker transforms, per layer) do, this fits R to the layer itself: it
minimizes, by gradient descent on calibration samples x, the output error of every linear W
reading x,

    sum_W || Q_a(x R) Q_w(W R)^T - x W^T ||^2        (Q: fake quantization, rounding passed straight through)

keeping each factor orthogonal as F_i = F_i0 expm(A_i - A_i^T), from A_i = 0 (today's factors,
so the first step starts where the fixed rotation is). The factors keep their sizes, so R stays
a Kronecker product applied at run time as before, less the Walsh-Hadamard shortcut of a
Sylvester factor (`q4_cpu::kron_factor` instead: SmolLM2's 512-token prefill 14% slower).
Q_a is the static per-tensor step (clip * max |x R| / max code, the gradient flowing through
the max too, which pulls the largest rotated values in), Q_w per-row round-to-nearest
(insert-quantizers may round with GPTQ afterwards).

Every fourth sample row is held out: the learned factors are kept only if their output error on
those rows, each side at its best clipping ratio, is below the starting factors' (never a worse
layer). A NaN or infinite loss stops the descent and keeps the starting factors.

Cost: a step is a few matrix products of the samples and 512 weight rows (MAX_WEIGHT_ROWS), about
10 ms for SmolLM2's q/k/v or o_proj, 15 ms for gate/up, 28 ms for down_proj (2 threads). It is
bound by those products: learning all 30 layers of a kind together in batched products was no
faster (measured), so each layer learns alone.

What it gains, held-out output SQNR over the fixed rotation on SmolLM2-135M layers 3, 15 and 25
(120 steps at rate 0.02; a /tmp scratch script calling `learn_rotation` on the calibrated
groups): q/k/v +0.6 to +1.0 dB, o_proj +1.8 to +2.1, gate/up +0.3 to +0.6, down_proj +0.1 to
+0.6. Fewer steps at a higher rate, fewer weight rows a step, or a cosine-decayed rate all gained
less; 240 steps at 0.01 gained 4% more than 120 at 0.02, for 40% more time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from qcompile.algorithms.scale_search import BLOCK_ROWS, CLIPS
from qcompile.kernels import formats

# A step's loss is measured on a fresh uniform draw of this many weight rows (they round
# independently): an unbiased estimate of the whole error at a bounded cost. Every training sample
# row is in every step: the activation step is their max.
MAX_WEIGHT_ROWS = 512


@dataclasses.dataclass(frozen=True)
class LearnedRotation:
    """The outcome of `learn_rotation`: `factors` are the learned ones if `learned`, else the start."""

    factors: list[torch.Tensor]
    learned: bool
    error_start: float  # held-out output error with the starting factors (best clip)
    error_learned: float  # ... with the learned ones (nan: the descent diverged)


def kron_apply(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """x @ kron(*factors) for 2-D x, one tensordot per factor (differentiable)."""
    sizes = [f.shape[0] for f in factors]
    y = x.reshape(x.shape[0], *sizes)
    for axis, f in enumerate(factors, start=1):
        y = torch.tensordot(y, f, dims=([axis], [0])).movedim(-1, axis)
    return y.reshape(x.shape)


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """round(t) forward, identity backward (the straight-through estimator)."""
    return t + (torch.round(t) - t).detach()


def _fake_quant(t: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integer fake quantization with the given step(s), rounding straight through."""
    q_max = formats.max_value(formats.INT, bits)
    return _round_ste(t / step).clamp(-q_max - 1, q_max) * step


def _quantized_weight(w_rot: torch.Tensor, w_bits: int) -> torch.Tensor:
    """Per-row round-to-nearest (the step maps each row's absmax onto the largest code)."""
    step = w_rot.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / formats.max_value(formats.INT, w_bits)
    return _fake_quant(w_rot, step, w_bits)


def _quantized_error(x_rot: torch.Tensor, wq: torch.Tensor, reference: torch.Tensor, clip: float,
                     a_bits: int) -> torch.Tensor:
    """|| Q_a(x_rot) wq^T - reference ||^2 with the static step clip * max |x_rot| (differentiable)."""
    a_step = (clip * x_rot.abs().max()).clamp_min(1e-12) / formats.max_value(formats.INT, a_bits)
    return (_fake_quant(x_rot, a_step, a_bits) @ wq.t() - reference).pow(2).sum()


def _best_error(x: torch.Tensor, weights: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], w_bits: int,
                a_bits: int) -> tuple[float, float]:
    """(least output error over the clipping ratios, that ratio) of x and the stacked rows of
    `weights` rotated by factors, summed over blocks of rows (they round independently)."""
    x_rot = kron_apply(x, factors)
    errors = [0.0] * len(CLIPS)
    for block in _row_blocks(weights):
        wq, reference = _quantized_weight(kron_apply(block, factors), w_bits), x @ block.t()
        for i, c in enumerate(CLIPS):
            errors[i] += _quantized_error(x_rot, wq, reference, c, a_bits).item()
    return min(zip(errors, CLIPS))


def _row_blocks(weights: Sequence[torch.Tensor]):
    """The rows of `weights` stacked, in float32, BLOCK_ROWS at a time (the last block shorter).
    An lm_head of 49152 x 576 stacked, rotated and rounded whole made about 400 MiB of float32
    temporaries; groups of fewer rows (every SmolLM2 group but the head) are one block, computed
    as before to the bit."""
    pieces, rows = [], 0
    for w in weights:
        start = 0
        while start < w.shape[0]:
            piece = w.detach()[start:start + BLOCK_ROWS - rows].float()
            pieces.append(piece)
            rows += piece.shape[0]
            start += piece.shape[0]
            if rows == BLOCK_ROWS:
                yield torch.cat(pieces)
                pieces, rows = [], 0
    if pieces:
        yield torch.cat(pieces)


def _gather_rows(weights: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """torch.cat(weights)[rows] in float32, without stacking the weights (copies only)."""
    device = weights[0].device
    rows = rows.to(device)
    ends = torch.tensor([w.shape[0] for w in weights], device=device).cumsum(0)
    which = torch.searchsorted(ends, rows, right=True)
    out = torch.empty(rows.shape[0], weights[0].shape[1], device=device)
    for k, w in enumerate(weights):
        picked = which == k
        if picked.any():
            out[picked] = w.detach()[rows[picked] - (ends[k] - w.shape[0])].float()
    return out


def learn_rotation(x: torch.Tensor, weights: Sequence[torch.Tensor], factors: Sequence[torch.Tensor],
                   steps: int, w_bits: int = 4, a_bits: int = 4, rate: float = 0.01,
                   seed: int = 0) -> LearnedRotation:
    """Fit orthogonal factors (starting from `factors`) to the quantized output error of `weights`
    (each [out, n]) on the sample rows `x` ([rows, n], unrotated); see the module docstring."""
    start = [f.detach().float() for f in factors]
    x = x.detach().float()
    held = torch.arange(x.shape[0]) % 4 == 3
    train, test = (x[~held], x[held]) if held.any() and (~held).any() else (x, x)
    with torch.no_grad():
        error_start, clip = _best_error(test, weights, start, w_bits, a_bits)
    if steps <= 0 or train.shape[0] == 0 or not math.isfinite(error_start) or error_start == 0.0:
        return LearnedRotation(start, False, error_start, error_start)
    generator = torch.Generator().manual_seed(seed)
    skews = [torch.zeros_like(f, requires_grad=True) for f in start]
    optimizer = torch.optim.Adam(skews, lr=rate)
    with torch.no_grad():
        reference = torch.cat([train @ block.t() for block in _row_blocks(weights)], dim=1)
    scale = reference.pow(2).sum().clamp_min(1e-30)
    total_rows = sum(w.shape[0] for w in weights)  # rows quantize independently: drawn from all
    with torch.enable_grad():  # (the backend runs the passes under no_grad)
        for _ in range(steps):
            rows = torch.randperm(total_rows, generator=generator)[:MAX_WEIGHT_ROWS]
            current = [f @ torch.linalg.matrix_exp(a - a.t()) for f, a in zip(start, skews)]
            wq = _quantized_weight(kron_apply(_gather_rows(weights, rows), current), w_bits)
            loss = _quantized_error(kron_apply(train, current), wq, reference[:, rows], clip, a_bits) / scale
            if not torch.isfinite(loss):
                return LearnedRotation(start, False, error_start, math.nan)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():  # orthogonal to float64 precision, then float32
        learned = [(f.double() @ torch.linalg.matrix_exp((a - a.t()).double())).float().contiguous()
                   for f, a in zip(start, skews)]
        error_learned, _ = _best_error(test, weights, learned, w_bits, a_bits)
    better = error_learned < error_start
    return LearnedRotation(learned if better else start, better, error_start, error_learned)
