"""The FP4 (E2M1) format of the LLM-FP4 recipe: 4-bit floats, two a byte along K like int4.py.

A code is a nibble: bit 3 the sign, bits 0-2 an index into the magnitudes

    E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]        (2 exponent bits, 1 mantissa bit, bias 1)

    x ~= decode(code) * scale        scale float32: per tensor (activations) or per row (weights)

Quantizing rounds |x| / scale to the nearest magnitude (a tie goes to the smaller one) and
saturates at 6. `pack_fp4` stores code[2j] in the low nibble and code[2j + 1] in the high one.
"""

from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MAX = 6.0
_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])])


def quantize_fp4(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Nibble codes (uint8, x's shape) of x / scale rounded to the nearest E2M1 value."""
    v = x.to(torch.float32) / scale
    index = torch.bucketize(v.abs(), _MIDPOINTS.to(v.device)).to(torch.uint8)  # tie -> smaller
    return torch.where((v < 0) & (index > 0), index | 8, index)


def decode_fp4(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of nibble codes (uint8)."""
    magnitude = torch.tensor(E2M1, device=codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [..., K] -> uint8 [..., ceil(K/2)], two a byte (low nibble first)."""
    if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) > 15):
        raise ValueError(f"pack_fp4: codes must be uint8 nibbles in 0..15, got {codes.dtype}")
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(k/2)] -> uint8 nibbles [..., k]: the inverse of pack_fp4."""
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return codes[..., :k]


def scale_for(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """absmax / 6 (per tensor, or per slice along `dim`), 1 where the absmax is 0."""
    peak = x.abs().amax() if dim is None else x.abs().amax(dim=dim)
    peak = peak.to(torch.float32)
    return torch.where(peak > 0, peak / MAX, torch.ones_like(peak))
