"""GPTQ: round a linear's weight to int4 column by column, compensating each rounding error in
the columns not yet rounded (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers").

Round-to-nearest minimizes the error of each weight on its own; what matters is the error of the
layer's output, ||X W^T - X Q^T||^2 over calibration inputs X. With H = X^T X (the input's Gram
matrix, accumulated during calibration), rounding column j with error e_j is compensated by
moving e_j * H^-1[j, j+1:] / H^-1[j, j] into the later columns (the optimal brain surgeon update).
Columns are visited in order of decreasing H[j, j] (GPTQ's "act order"): the channels with large
activations are rounded first, while every other column can still absorb their error. The
format is unchanged: per-output-channel symmetric steps, chosen before rounding (with a
clipping ratio per row that minimizes the row's own squared error), then int4 codes. With a 4-bit
float format (`qcompile/kernels/formats.py`, LLM-FP4) the grid is the format's values: the same algorithm
rounds each column to the nearest of them.

After migrate-scales the weight columns of outlier channels are multiplied by large scales and
per-row rounding of W * s gets much worse; the compensation recovers most of it.

Grouped steps (`quantize_gptq(..., group=32)`, `quantize_grouped`): each group of `group`
consecutive k of a row gets a step of its own, an integer multiple 1..M of the row's base step
absmax / (max_value * M) (M = formats.max_multiplier: 15 for int4), so the kernels' integers stay
int8 (formats.py). Each group's multiplier is the one with the least squared rounding error of
the group, chosen up front from the weight before any compensation ("static groups", as
AutoGPTQ does with act order, whose column order scatters a group's columns over the run).
"""

from __future__ import annotations

import math

import torch

from qcompile.kernels import formats

# Per-row clipping ratios of the weight step tried before rounding (1.0: the row's absmax).
WEIGHT_CLIPS = tuple(1.0 - 0.05 * i for i in range(8))
BLOCK = 128  # columns updated together (the lazy batch update of the paper; any size is exact)
# Rows rounded together (rows are independent: any size rounds alike). A block's temporaries are
# about seven float32 copies of it: 16 MiB at 1024 rows of SmolLM2's head (K = 576), where 4096
# rows made the largest transient of its whole quantization; its other weights are one block.
ROWS = 1024
DAMPING = 0.01  # fraction of the mean diagonal added to H so its inverse exists


def weight_steps(weight: torch.Tensor, bits: int, clips=WEIGHT_CLIPS, fmt: str = formats.INT) -> torch.Tensor:
    """Per-row symmetric step: absmax * clip / max_value (qmax for int), the clip per row
    minimizing the row's squared rounding error. An all-zero row gets step 1 (its codes are 0)."""
    qmax = formats.max_value(fmt, bits)
    absmax = weight.abs().amax(dim=1)
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for clip in clips:
        step = (absmax * clip / qmax).clamp(min=1e-12)
        q = formats.round_to_format(weight / step[:, None], fmt, bits) * step[:, None]
        err = (q - weight).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, step, best)
    return torch.where(absmax > 0, best, torch.ones_like(best))


def group_multipliers(weight: torch.Tensor, group: int, bits: int = 4,
                      fmt: str = formats.INT) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 base step [N], uint8 multipliers [N, K / group]) of grouped steps: base = the row's
    absmax / (max_value * M); each group's multiplier in 1..M the one with the least squared
    rounding error of the group (a clipping search on a grid of M steps). K must be a multiple of
    `group`; an all-zero row gets base 1 (and multipliers 1: its codes are 0)."""
    n, k = weight.shape
    if group <= 0 or k % group:
        raise ValueError(f"gptq: group {group} does not divide K = {k}")
    top = formats.max_multiplier(fmt)
    w = weight.detach().to(torch.float32).reshape(n, k // group, group)
    absmax = w.abs().amax(dim=(1, 2))
    base = torch.where(absmax > 0, absmax / (formats.max_value(fmt, bits) * top), torch.ones_like(absmax))
    best_err = torch.full(w.shape[:2], float("inf"), device=w.device)
    best = torch.ones(w.shape[:2], device=w.device)
    for m in range(1, top + 1):
        step = (base * m)[:, None, None]
        err = (formats.round_to_format(w / step, fmt, bits) * step - w).pow(2).sum(dim=2)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, float(m), best)
    return base, best.to(torch.uint8)


def quantize_grouped(weight: torch.Tensor, group: int, bits: int = 4,
                     fmt: str = formats.INT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest with grouped steps: (int8 codes [N, K], base step [N], uint8 multipliers
    [N, K / group]); w ~ codes * multiplier of the group * base."""
    base, mult = group_multipliers(weight, group, bits, fmt)
    steps = base[:, None] * mult.to(torch.float32).repeat_interleave(group, dim=1)
    codes = formats.round_to_format(weight.detach().to(torch.float32) / steps, fmt, bits)
    return codes.to(torch.int8), base, mult


def quantize_gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int = 4, fmt: str = formats.INT,
                  group: int = 0) -> tuple[torch.Tensor, ...]:
    """(int8 codes [N, K], float32 step [N]) of `weight` [N, K] given its input's Gram matrix
    `gram` [K, K] (sum of x^T x over calibration tokens). Codes are values of `fmt`: for int, in
    [-2**(bits-1), 2**(bits-1) - 1]. With `group` (a divisor of K): (codes, base step [N], uint8
    multipliers [N, K / group]), the weight ~ codes * multiplier of the group * base."""
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq: gram must be [K, K] = {[weight.shape[1]] * 2} for a weight of shape "
                         f"{list(weight.shape)}, got {list(gram.shape)}")
    h = gram.to(torch.float32).clone()
    dead = torch.diag(h) == 0  # channels never active in calibration: nothing to compensate with
    if not dead.all():
        # GPTQ does not depend on the scale of H. Divided by the power of 4 nearest its mean live
        # diagonal (exactly: every later step rounds as it did), the factorizations stay within
        # float32's range: inputs of 1e-19 made a Gram matrix of 1e-38 that Cholesky could not factor.
        h /= 4.0 ** round(math.log(torch.diag(h)[~dead].double().mean().item(), 4))
    h[dead, dead] = 1
    order = torch.argsort(torch.diag(h), descending=True)
    h = h[order][:, order]
    h.diagonal().add_(DAMPING * torch.mean(torch.diag(h)))
    # The upper Cholesky factor of H^-1: row j holds the update coefficients of column j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # Each row is rounded on its own (H is shared): by blocks of rows, a tall weight's temporaries
    # stay small (an lm_head of 49152 x 576 whole made ~0.5 GB of them), each block's results
    # written into the whole ones (not concatenated at the end: a second copy of the codes).
    results: tuple[torch.Tensor, ...] = ()
    for r in range(0, max(weight.shape[0], 1), ROWS):
        block = _gptq_rows(weight[r:r + ROWS], dead, order, hinv, bits, fmt, group)
        if not results:
            results = tuple(torch.empty((weight.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device) for t in block)
        for whole, part in zip(results, block):
            whole[r:r + ROWS] = part
    return results


def _gptq_rows(weight: torch.Tensor, dead: torch.Tensor, order: torch.Tensor, hinv: torch.Tensor, bits: int,
               fmt: str, group: int) -> tuple[torch.Tensor, ...]:
    """`quantize_gptq` of some rows of a weight, given H's dead channels, the column order and
    the upper Cholesky factor of H^-1 (in that order)."""
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0
    if group:
        base, mult = group_multipliers(w, group, bits, fmt)
        column_steps = base[:, None] * mult.to(torch.float32).repeat_interleave(group, dim=1)  # [N, K]
    else:
        step = weight_steps(w, bits, fmt=fmt)
        column_steps = step[:, None].expand_as(w)
    w, column_steps = w[:, order], column_steps[:, order]

    codes = torch.zeros_like(w)
    k = w.shape[1]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            column, step = block[:, i], column_steps[:, start + i]
            c = formats.round_to_format(column / step, fmt, bits)
            codes[:, start + i] = c
            error = (column - c * step) / hblock[i, i]
            block[:, i:] -= error[:, None] * hblock[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    codes = codes[:, torch.argsort(order)].to(torch.int8)
    return (codes, base, mult) if group else (codes, step)


def low_rank_compensation(error: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [N, r], B [r, K]) minimizing the layer-output error of the weight's quantization error
    E = W - Q(W) [N, K] left after subtracting A B: ||X (E - A B)^T||^2 = ||(E - A B) L||_F^2 with
    H = X^T X = L L^T (damped like GPTQ's). The best rank-r approximation of E L (its top singular
    triplets, U_r S_r V_r^T) divided by L on the right: A = U_r S_r, B = V_r^T L^-1 (ZeroQuant-V2's
    LoRC, weighted by the input as GPTQ is; MergeQuant's compensation)."""
    k = error.shape[1]
    h = gram.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(DAMPING * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(h)
    u, s, vh = torch.linalg.svd(error.to(torch.float64) @ lower, full_matrices=False)
    r = min(rank, s.numel())
    a = u[:, :r] * s[:r]
    # B = V_r^T L^-1, i.e. B^T = L^-T V_r: one triangular solve
    b = torch.linalg.solve_triangular(lower.t(), vh[:r].t(), upper=True).t()
    return a.to(torch.float32), b.reshape(r, k).to(torch.float32)
