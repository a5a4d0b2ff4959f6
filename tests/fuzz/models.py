"""Random small models for the fuzzer (tests/fuzz/test_fuzz_graphs.py).

A hypothesis strategy, `programs()`, draws a `Program`: plain data naming the blocks (norm,
linear, activation, residual around a sub-block, a product of two linear projections, an
attention block), the widths, the input and calibration shapes, the dtype, the recipe and a seed.
`build(program)` turns it into a `torch.nn.Module` and its inputs. A failing example prints its
Program, and pasting that repr into `build` rebuilds the same model and data:

    from tests.fuzz.models import *
    model, x, calibration = build(Program(width=33, blocks=(Linear(out=5, bias=True),), ...))
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["Norm", "Linear", "Act", "Residual", "Matmul", "Attention", "Program", "programs", "build", "sign_like",
           "FuzzModel", "RECIPES", "DTYPES"]

# Every recipe; each compiles a small model in a second or a few (fp4's format search). The default,
# "w4a4", learns its rotations by 120 steps a layer: the test runs its passes with 2 (tests/helpers/recipes.py).
RECIPES = ("w4a4-rtn", "w4a4-hadamard", "w4a8", "w4a16", "fp4-e2m1", "w4a4-smoothquant", "w4a4-qsm",
           "w4a4-dynamic", "w4a4-split", "fp4", "w4a4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
MAX_WIDTH = 96
# Widths the kernels treat specially (packing two codes a byte, groups of 32, Hadamard factors) come
# up more often than a uniform draw would give them; every width 1..96 can be drawn.
EDGE_WIDTHS = (1, 2, 3, 7, 16, 31, 32, 33, 47, 63, 64, 65, 95, 96)
OUTLIER_GAIN = 25.0  # the drawn outlier input channels are this much larger than the rest


@dataclasses.dataclass(frozen=True)
class Norm:
    kind: str  # "layer" (nn.LayerNorm) or "rms" (nn.RMSNorm)
    affine: bool = True


@dataclasses.dataclass(frozen=True)
class Linear:
    out: int
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class Act:
    name: str  # a key of ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class Residual:
    body: tuple  # blocks mapping the width to itself


@dataclasses.dataclass(frozen=True)
class Matmul:
    """(a(x) @ b(x)^T / inner) @ x / seq: an attention-score-like product of two projections, no softmax."""

    inner: int
    bias: bool = False


@dataclasses.dataclass(frozen=True)
class Attention:
    heads: int  # divides the width
    kv_heads: int  # divides heads (grouped-query attention when fewer)
    causal: bool = False
    bias: bool = False


@dataclasses.dataclass(frozen=True)
class Program:
    width: int  # the input's width
    blocks: tuple
    dtype: str = "float32"
    batch: int = 1
    seq: int = 1
    calibration: tuple = ((1, 1),)  # (batch, seq) of each calibration batch
    outliers: tuple = ()  # input channels OUTLIER_GAIN times larger (in calibration too)
    recipe: str = "w4a4-rtn"
    seed: int = 0


def out_width(block, width: int) -> int:
    return block.out if isinstance(block, Linear) else width


def sign_like(program: Program) -> bool:
    """Whether a norm reads 1 or 2 channels: LayerNorm of 2 (RMSNorm of 1) is a sign function, so
    a last-bit difference before it can flip an output whole; LayerNorm of 1 is rounding noise."""

    def walk(blocks: tuple, width: int) -> bool:
        for block in blocks:
            if isinstance(block, Norm) and width <= 2 or isinstance(block, Residual) and walk(block.body, width):
                return True
            width = out_width(block, width)
        return False

    return walk(program.blocks, program.width)


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


widths = st.one_of(st.sampled_from(EDGE_WIDTHS), st.integers(1, MAX_WIDTH))


@st.composite
def _block(draw, width: int, depth: int):
    kinds = ["linear", "norm", "act", "matmul", "attention"] + (["residual"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        return Linear(draw(widths), draw(st.booleans()))
    if kind == "norm":
        return Norm(draw(st.sampled_from(["layer", "rms"])), draw(st.booleans()))
    if kind == "act":
        return Act(draw(st.sampled_from(list(ACTIVATIONS))))
    if kind == "matmul":
        return Matmul(draw(widths), draw(st.booleans()))
    if kind == "attention":
        heads = draw(st.sampled_from(_divisors(width, 8)))
        return Attention(heads, draw(st.sampled_from(_divisors(heads, heads))), draw(st.booleans()), draw(st.booleans()))
    body, end = draw(_blocks(width, depth + 1))
    if end != width:  # project back, so the sum is defined
        body = (*body, Linear(width, draw(st.booleans())))
    return Residual(body)


@st.composite
def _blocks(draw, width: int, depth: int = 0):
    """(blocks, the width they end at): 1..4 blocks at the top, fewer inside residuals."""
    blocks = []
    for _ in range(draw(st.integers(1, 4 - depth))):
        block = draw(_block(width, depth))
        blocks.append(block)
        width = out_width(block, width)
    return tuple(blocks), width


shapes = st.tuples(st.integers(1, 3), st.integers(1, 17))  # (batch, seq)


@st.composite
def programs(draw, recipes=RECIPES):
    width = draw(widths)
    blocks, _ = draw(_blocks(width))
    batch, seq = draw(shapes)
    return Program(
        width=width,
        blocks=blocks,
        dtype=draw(st.sampled_from(list(DTYPES))),
        batch=batch,
        seq=seq,
        calibration=tuple(draw(st.lists(shapes, min_size=1, max_size=3))),
        outliers=tuple(draw(st.lists(st.integers(0, width - 1), max_size=3, unique=True))),
        recipe=draw(st.sampled_from(recipes)),
        seed=draw(st.integers(0, 2**16)),
    )


# --- the modules ---------------------------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self, blocks: tuple, width: int):
        super().__init__()
        layers = []
        for block in blocks:
            layers.append(_module(block, width))
            width = out_width(block, width)
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, block: Residual, width: int):
        super().__init__()
        self.body = Stack(block.body, width)

    def forward(self, x):
        return x + self.body(x)


class ActBlock(nn.Module):
    def __init__(self, block: Act):
        super().__init__()
        self.name = block.name

    def forward(self, x):
        return ACTIVATIONS[self.name](x)


class MatmulBlock(nn.Module):
    def __init__(self, block: Matmul, width: int):
        super().__init__()
        self.a = nn.Linear(width, block.inner, bias=block.bias)
        self.b = nn.Linear(width, block.inner, bias=block.bias)
        self.inner = block.inner

    def forward(self, x):
        scores = self.a(x) @ self.b(x).transpose(-1, -2) / self.inner
        return scores @ x / x.shape[-2]


class AttentionBlock(nn.Module):
    def __init__(self, block: Attention, width: int):
        super().__init__()
        self.heads, self.kv_heads, self.causal = block.heads, block.kv_heads, block.causal
        self.head_dim = width // block.heads
        self.q = nn.Linear(width, width, bias=block.bias)
        self.k = nn.Linear(width, block.kv_heads * self.head_dim, bias=block.bias)
        self.v = nn.Linear(width, block.kv_heads * self.head_dim, bias=block.bias)
        self.o = nn.Linear(width, width, bias=block.bias)

    def forward(self, x):
        b, s, width = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(b, s, width))


def _module(block, width: int) -> nn.Module:
    if isinstance(block, Linear):
        return nn.Linear(width, block.out, bias=block.bias)
    if isinstance(block, Norm):
        norm = (nn.LayerNorm if block.kind == "layer" else nn.RMSNorm)(width, elementwise_affine=block.affine)
        if block.affine:  # not all ones: a migrated scale folded into it must show
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_(0.0, 0.1)
        return norm
    if isinstance(block, Act):
        return ActBlock(block)
    if isinstance(block, Residual):
        return ResidualBlock(block, width)
    if isinstance(block, Matmul):
        return MatmulBlock(block, width)
    if isinstance(block, Attention):
        return AttentionBlock(block, width)
    raise TypeError(f"not a block: {block!r}")


class FuzzModel(Stack):
    """The program's blocks in order; forward(x [batch, seq, width])."""

    def __init__(self, program: Program):
        super().__init__(program.blocks, program.width)


def build(program: Program) -> tuple[nn.Module, torch.Tensor, list[tuple[torch.Tensor]]]:
    """(model in the program's dtype, eval mode; the input; the calibration batches), all from its seed."""
    with torch.random.fork_rng():
        torch.manual_seed(program.seed)
        model = FuzzModel(program)
    dtype = DTYPES[program.dtype]
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(program.seed)
    gain = torch.ones(program.width)
    gain[list(program.outliers)] = OUTLIER_GAIN

    def batch(b: int, s: int) -> torch.Tensor:
        return (torch.randn(b, s, program.width, generator=g) * gain).to(dtype)

    x = batch(program.batch, program.seq)
    return model, x, [(batch(b, s),) for b, s in program.calibration]
