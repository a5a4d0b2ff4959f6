"""The tiled GPU GEMM's weight layout: packed 4-bit codes made K-major and chunk-interleaved.

The stored layout (`int4.py`, `formats.py`) packs k = 2j and 2j + 1 into byte j of row n
(uint8 [N, ceil(K/2)]). A GEMM tile reads a weight block as [k, n] (the dot's right operand), so
from that layout it gathers one byte per n at a stride of K/2 bytes, and the activation's even
and odd k as two stride-2 gathers. The lowering re-lays each covered weight once, when it
compiles (`to_tiled`), as

    tiled[32c + i, n] = nibble(w[n, 64c + i]) | nibble(w[n, 64c + 32 + i]) << 4      uint8 [K/2, N]

(c the 64-k chunk, i < 32, nibble the code's 4 stored bits: any format): a tile's weight rows
are contiguous along N (coalesced 16-byte loads), and the k a byte holds are two contiguous
runs of 32, so the activation loads are contiguous too (`triton_tiled_gemm.py`).

The layout covers K a multiple of 64 (every hidden size of the LLMs this compiler targets);
another weight keeps the stored layout and the general kernel (`covers`). Group multipliers
(`formats.py`: groups of a multiple of 32 k) stay as they are: the kernel reads each nibble's.
"""

from __future__ import annotations

import torch

CHUNK = 64  # k a chunk interleaves: its byte i holds k = i (low nibble) and k = 32 + i (high)


def covers(k: int) -> bool:
    """Whether a weight of K = k has a tiled layout."""
    return k > 0 and k % CHUNK == 0


def _nibbles(w_packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (stored layout) -> the 4-bit codes' bits, uint8 [N, K] (k in order)."""
    return torch.stack((w_packed & 15, w_packed >> 4), dim=-1).reshape(w_packed.shape[0], -1)


def to_tiled(w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """The stored packed weight uint8 [N, k/2] -> the tiled layout uint8 [k/2, N] (contiguous)."""
    if not covers(k) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.shape[1] != k // 2:
        raise ValueError(f"to_tiled: needs a packed uint8 weight [N, k/2] with k a positive multiple of {CHUNK}, "
                         f"got {w_packed.dtype} {tuple(w_packed.shape)} with k={k}")
    n = w_packed.shape[0]
    chunks = _nibbles(w_packed).view(n, k // CHUNK, 2, CHUNK // 2)  # [n, c, low/high half, i]
    tiled = chunks[:, :, 0] | (chunks[:, :, 1] << 4)  # [n, c, i]
    return tiled.reshape(n, k // 2).t().contiguous()


def from_tiled(w_tiled: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_tiled`: uint8 [k/2, N] -> the stored layout uint8 [N, k/2]."""
    half, n = w_tiled.shape
    rows = w_tiled.t().reshape(n, half // (CHUNK // 2), 1, CHUNK // 2)
    nibbles = torch.cat((rows & 15, rows >> 4), dim=2).reshape(n, 2 * half)  # k in order
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


__all__ = ["CHUNK", "covers", "to_tiled", "from_tiled"]
