"""Orthogonal rotations of activations: `q4::rotate(x, factors)` = x @ kron(*factors).

A linear is unchanged when its input is rotated by an orthogonal R and its weight too:
(x R)(W R)^T = x W^T. A Hadamard-like R spreads each outlier channel evenly over all channels
(QuaRot, SpinQuant), so one per-tensor step fits the rotated activation far better, and the
weight's rows flatten the same way. R is applied as a Kronecker product of small factors,

    R = kron(F_1, ..., F_r),    x R  =  apply F_i along axis i of x viewed as [..., d_1, ..., d_r]

which costs sum(d_i) multiply-adds an element instead of n for a dense R. For n = m * 2**k
(m odd) the factors are a fixed random orthogonal m x m (QR of a seeded Gaussian; m = 1 needs
none) and two normalized Sylvester-Hadamard matrices of sizes 2**ceil(k/2) and 2**floor(k/2).
"""

from __future__ import annotations

import math

import torch

SEED = 0  # the odd-size factor is random but fixed: a rotation is a function of n alone


def _sylvester(size: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def rotation_factors(n: int) -> list[torch.Tensor]:
    """Orthogonal float32 factors whose Kronecker product is the n x n rotation."""
    if n < 1:
        raise ValueError(f"rotation_factors: n must be >= 1, got {n}")
    power = (n & -n).bit_length() - 1  # n = odd * 2**power
    odd = n >> power
    factors = []
    if odd > 1:
        gaussian = torch.randn(odd, odd, generator=torch.Generator().manual_seed(SEED + odd), dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        factors.append((q * torch.sign(torch.diagonal(r))).float().contiguous())  # sign-fixed: unique given the seed
    high = (power + 1) // 2
    for size in (2**high, 2 ** (power - high)):
        if size > 1:
            factors.append(_sylvester(size))
    return factors or [torch.ones(1, 1)]


def rotate_reference(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ kron(*factors) over the last dimension, computed with the dense matrix (for tests)."""
    dense = factors[0]
    for f in factors[1:]:
        dense = torch.kron(dense, f)
    return x @ dense.to(x.dtype)


@torch.library.custom_op("q4::rotate", mutates_args=())
def rotate(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ kron(*factors) over the last dimension, one 2-D matmul per factor.

    With x viewed as [M, d_1, ..., d_r], the last factor multiplies the last axis; then that axis
    is moved to the front (one transposing copy), so the next factor's axis is last. After r steps
    the axes are back in order. Each matmul is a plain [M * n / d, d] @ [d, d] GEMM.
    """
    sizes = [f.shape[0] for f in factors]
    n = math.prod(sizes)
    if x.shape[-1] != n:
        raise ValueError(f"q4::rotate: argument 'x' must have last dimension {n} (the product of the "
                         f"factor sizes {sizes}), got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    if x.numel() == 0:
        return x.clone()
    y = x.reshape(-1, n)
    for f in reversed(factors):
        d = f.shape[0]
        y = (y.reshape(-1, d) @ f.to(x.dtype)).reshape(-1, n // d, d).transpose(1, 2).reshape(-1, n)
    return y.reshape(*lead, n)


@rotate.register_fake
def _(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(x)
