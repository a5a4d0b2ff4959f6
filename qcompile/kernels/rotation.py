"""Orthogonal rotations of activations: `q4::rotate(x, factors)` = x @ kron(*factors).

A linear is unchanged when its input is rotated by an orthogonal R and its weight too:
(x R)(W R)^T = x W^T. A Hadamard-like R spreads each outlier channel evenly over all channels
(QuaRot, SpinQuant), so one per-tensor step fits the rotated activation far better, and the
weight's rows flatten the same way. R is applied as a Kronecker product of small factors,

    R = kron(F_1, ..., F_r),    x R  =  apply F_i along axis i of x viewed as [..., d_1, ..., d_r]

which costs sum(d_i) multiply-adds an element instead of n for a dense R. For n = m * 2**k
(m odd) the factors are a fixed random orthogonal m x m (QR of a seeded Gaussian; m = 1 needs
none) and normalized Sylvester-Hadamard matrices of at most 64 x 64, as few as will do and of
balanced sizes (2**9 = 32 x 16). A Kronecker product of Sylvester matrices is the Sylvester
matrix of the product size, so how 2**k is split changes the cost, never R.

rotate-inputs{learn-steps=N} learns the factors instead (starting from these): any orthogonal
factors, flagged `hadamard=False` on the op, which then makes no Walsh-Hadamard shortcut.

Two implementations: `q4::rotate` (the op the graph holds; eager: one GEMM and one transposing
copy per factor) and `rotate_decomposed`, the form the Inductor lowering traces instead. It
applies the odd factor as a broadcast multiply and a sum over that factor's axis, which
Inductor compiles into loops fused with the rotation's producer and consumer (the activation
quantize), with no transposing copies; the Sylvester factors, together one Hadamard matrix, run
as a fast Walsh-Hadamard transform (`q4_cpu::hadamard`, qcompile/kernels/cpu_kernels.py) on CPU, as a GEMM
or loops elsewhere.
"""

from __future__ import annotations

import functools
import math

import torch

from . import cpu_kernels

SEED = 0  # the odd-size factor is random but fixed: a rotation is a function of n alone
MAX_HADAMARD_LOG2 = 6  # Sylvester factors of at most 64 x 64
GEMM_FACTOR_MIN = 64  # rotate_decomposed: a last factor at least this large runs as a GEMM...
GEMM_MIN_ROWS = 8  # ...unless x has at most this many rows, known at trace time (decode): then loops
HADAMARD_MIN = 16  # on CPU, a Sylvester part at least this large runs as q4_cpu's Walsh-Hadamard transform


def sylvester(size: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order `size` (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def _is_power_of_two(d: int) -> bool:
    return d > 1 and d & (d - 1) == 0


@functools.cache
def _sylvester_cached(size: int) -> torch.Tensor:
    return sylvester(size)  # for q4::rotate's check of its factors, every call


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
    count = -(-power // MAX_HADAMARD_LOG2)  # as few factors of <= 64 as will do, balanced
    for i in range(count):
        factors.append(sylvester(2 ** ((power + i) // count)))
    return factors or [torch.ones(1, 1)]


def rotate_reference(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ kron(*factors) over the last dimension, computed with the dense matrix (for tests)."""
    dense = factors[0]
    for f in factors[1:]:
        dense = torch.kron(dense, f)
    return x @ dense.to(x.dtype)


@torch.library.custom_op("q4::rotate", mutates_args=())
def rotate(x: torch.Tensor, factors: list[torch.Tensor], hadamard: bool = True) -> torch.Tensor:
    """x @ kron(*factors) over the last dimension, one 2-D matmul per factor.

    With `hadamard` (the default), `factors` are `rotation_factors(n)`'s kind: any orthogonal
    factors, but those of a power-of-two size are normalized Sylvester-Hadamard matrices (the
    lowering computes them as a Walsh-Hadamard transform; checked here). Without it, any factors
    (learned ones, see `algorithms/learn_rotation.py`), multiplied as they are: on CPU in float32
    by `q4_cpu::kron_factor`, as the lowering does, so that an eager run too rounds each row the
    same way at any number of rows (a left-padded batch row gets its tokens alone).

    With x viewed as [M, d_1, ..., d_r], the last factor multiplies the last axis; then that axis
    is moved to the front (one transposing copy), so the next factor's axis is last. After r steps
    the axes are back in order. Each matmul is a plain [M * n / d, d] @ [d, d] GEMM.
    """
    sizes = [f.shape[0] for f in factors]
    n = math.prod(sizes)
    if x.shape[-1] != n:
        raise ValueError(f"q4::rotate: argument 'x' must have last dimension {n} (the product of the "
                         f"factor sizes {sizes}), got shape {tuple(x.shape)}")
    for f in factors if hadamard else ():
        d = f.shape[0]
        if _is_power_of_two(d) and not torch.equal(f, _sylvester_cached(d).to(f.device, f.dtype)):
            raise ValueError(f"q4::rotate: a factor of size {d} (a power of two) must be the normalized "
                             f"Sylvester-Hadamard matrix `rotation.sylvester({d})`, as `rotation_factors` makes it")
    lead = x.shape[:-1]
    if x.numel() == 0:
        return x.clone()
    if _takes_factor_kernel(x, hadamard):  # as the lowering does: each row rounds alike at any M
        return _factor_kernel(x.reshape(-1, n), factors).reshape(*lead, n)
    y = x.reshape(-1, n)
    for f in reversed(factors):
        d = f.shape[0]
        y = (y.reshape(-1, d) @ f.to(x.dtype)).reshape(-1, n // d, d).transpose(1, 2).reshape(-1, n)
    return y.reshape(*lead, n)


def _takes_factor_kernel(x: torch.Tensor, hadamard: bool) -> bool:
    """Learned factors on CPU float32 run as q4_cpu::kron_factor (eager and lowered alike)."""
    return not hadamard and x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.load()


def _factor_kernel(y: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """y [M, n] @ kron(*factors), one q4_cpu::kron_factor call a factor."""
    sizes = [f.shape[0] for f in factors]
    for i, f in enumerate(factors):
        y = torch.ops.q4_cpu.kron_factor.default(y, f, math.prod(sizes[i + 1:]), cpu_kernels.FORCE_SCALAR)
    return y


@rotate.register_fake
def _(x: torch.Tensor, factors: list[torch.Tensor], hadamard: bool = True) -> torch.Tensor:
    return torch.empty_like(x)


# Rows of a weight rotated at once: an lm_head of 49152 x 576 rotated whole made ~200 MiB of
# float32 temporaries; in blocks they stay small. A weight of fewer rows is rotated whole; a
# taller one's values may round differently in the last bit than rotated whole (a GEMM's kernel
# can depend on its row count; at SmolLM2's width they were the same bits).
WEIGHT_ROWS = 4096


@torch.library.custom_op("q4::rotate_weight", mutates_args=())
def rotate_weight(weight: torch.Tensor, factors: list[torch.Tensor], hadamard: bool = True) -> torch.Tensor:
    """W @ kron(*factors) for a linear's weight W [N, K] (rotate-inputs' weight side, see
    `q4::rotate`): computed in float32 and stored in W's dtype, WEIGHT_ROWS rows at a time."""
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    for r in range(0, weight.shape[0], WEIGHT_ROWS):
        out[r:r + WEIGHT_ROWS] = rotate(weight[r:r + WEIGHT_ROWS].float(), factors, hadamard)
    return out


@rotate_weight.register_fake
def _(weight: torch.Tensor, factors: list[torch.Tensor], hadamard: bool = True) -> torch.Tensor:
    return torch.empty_like(weight)


def rotate_decomposed(x: torch.Tensor, factors: list[torch.Tensor], hadamard: bool = True) -> torch.Tensor:
    """`q4::rotate` in plain ATen ops that Inductor fuses (see the module docstring).

    With x viewed as [M, a, d, b] around factor F (d x d; a, b the sizes of the axes before and
    after it), y[m, a, i, b] = sum_j x[m, a, j, b] * F[j, i]: a broadcast multiply and a sum.
    On CPU (float32, q4_cpu built, `hadamard`) the trailing power-of-two factors, Sylvester matrices by
    `rotation_factors`' contract, whose Kronecker product is the Sylvester matrix H of their
    product size, run as one Walsh-Hadamard transform over the contiguous last axis
    (`torch.ops.q4_cpu.hadamard`: n log2 n additions for the n * n multiply-adds of a GEMM; a
    512 x 1536 activation (3 x 512) rotated in 0.47 against 0.92 ms, 512 x 576 (9 x 64) in 0.26
    against 0.39 ms, compiled alone, 2 threads). At any M: a row goes through the same
    additions in a prompt and in a decode step, so both round alike (a GEMM or loops at one and
    not the other flip 4-bit codes between the KV cache path and the no-cache forward).
    Elsewhere a last factor of GEMM_FACTOR_MIN or more multiplies the contiguous last axis as one
    GEMM, except for a static M of GEMM_MIN_ROWS or fewer (a decode step), where the loops
    fuse with the quantize and skip a call. Learned factors (not `hadamard`) run on CPU as
    `q4_cpu::kron_factor`, one call a factor at any M, for the same reason as the Walsh-Hadamard
    transform: a row rounds alike in a prompt and in a decode step (Inductor's loops for learned
    9 x 9 and 64 x 64 factors took 9.1 ms on 512 x 576, compiled with the quantize, against 0.86
    for the fixed ones; side by side, while another job shared the cores).
    The factors act on different axes, so they commute; the first (the odd one) goes last: the
    step fused with x's producer then reads 16 or more of its values, which makes Inductor
    compute the producer once into a buffer instead of again for each read (3 reads of
    `silu(gate) * up` for 1536 = 3 * 512: 1.76 ms against 1.11 ms for 512 tokens).
    """
    sizes = [f.shape[0] for f in factors]
    n = x.shape[-1]
    y = x.reshape(-1, n)
    m = y.shape[0]
    few_rows = isinstance(m, int) and m <= GEMM_MIN_ROWS
    sylvester_from = len(sizes)  # the trailing power-of-two factors start here
    while hadamard and sylvester_from > 0 and _is_power_of_two(sizes[sylvester_from - 1]):
        sylvester_from -= 1
    hadamard_size = math.prod(sizes[sylvester_from:])
    if _takes_factor_kernel(x, hadamard):
        return _factor_kernel(y, factors).reshape(x.shape)
    if hadamard_size >= HADAMARD_MIN and x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.load():
        y = torch.ops.q4_cpu.hadamard.default(y, hadamard_size, cpu_kernels.FORCE_SCALAR)
        sizes, factors = sizes[:sylvester_from], factors[:sylvester_from]
    elif sizes[-1] >= GEMM_FACTOR_MIN and not few_rows:
        y = (y.reshape(-1, sizes[-1]) @ factors[-1].to(x.dtype)).reshape(m, n)
        sizes, factors = sizes[:-1], factors[:-1]
    for i in [*range(1, len(factors)), 0][: len(factors)]:
        a, d = math.prod(sizes[:i]), sizes[i]
        b = n // (a * d)
        y = (y.reshape(m, a, d, 1, b) * factors[i].to(x.dtype).reshape(1, 1, d, d, 1)).sum(2).reshape(m, n)
    return y.reshape(x.shape)
