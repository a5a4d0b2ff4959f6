"""The FP4 (E2M1) format of the LLM-FP4 recipe: 4-bit floats, two a byte along K like int4.py.

A code is a nibble: bit 3 the sign, bits 0-2 an index i into the magnitudes

    E2M1[i] = [0, 0.5, 1, 1.5, 2, 3, 4, 6][i]    (2 exponent bits, 1 mantissa bit = bit 0 of i)

    x ~= decode(code) * scale        scale float32 = absmax / 6: per tensor or per row

Quantizing rounds |x| / scale to the nearest magnitude, a tie to the one with the even mantissa
(an even index, as IEEE round-half-to-even does: 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4), and
saturates at 6. `pack_fp4` stores code[2j] in the low nibble and code[2j + 1] in the high one;
an odd K is padded with code 0, the value +0, so it adds nothing to a dot product.
"""

from __future__ import annotations

from typing import Optional

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MAX = 6.0
_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1, E2M1[1:]))


def fp4_scale(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """float32 absmax / 6: 0-dim (per tensor) or x.shape[:-1] (per row); 1 where the absmax is 0."""
    if x.numel() == 0:  # amax refuses to reduce nothing
        peak = torch.zeros(x.shape[:-1] if per_row else (), device=x.device)
    else:
        peak = (x.abs().amax(dim=-1) if per_row else x.abs().amax()).to(torch.float32)
    return torch.where(peak > 0, peak / MAX, torch.ones_like(peak))


def quantize_fp4(x: torch.Tensor, scale: Optional[torch.Tensor] = None, per_row: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): uint8 nibble codes of x's shape for x / scale rounded to the nearest E2M1
    value (ties to even, saturating), and the float32 scale used. Without `scale` it is
    `fp4_scale(x, per_row)`; a given scale is 0-dim or one per row (shape x.shape[:-1])."""
    if not x.is_floating_point():
        raise TypeError(f"quantize_fp4: x must be a float tensor, got {x.dtype}")
    scale = fp4_scale(x, per_row) if scale is None else scale.to(torch.float32)
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("quantize_fp4: scale must be finite and > 0")
    v = x.to(torch.float32) / (scale.unsqueeze(-1) if scale.dim() else scale)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("quantize_fp4: x must be finite, got NaN or inf values")
    mid = torch.tensor(_MIDPOINTS, device=v.device)
    a = v.abs()
    index = torch.bucketize(a, mid)  # a == mid[i] gives i, the smaller neighbour
    tie = (index < len(mid)) & (a == mid[index.clamp(max=len(mid) - 1)])
    index = (index + (tie & (index % 2 == 1)).long()).to(torch.uint8)  # a tie goes to the even index
    return torch.where((v < 0) & (index > 0), index | 8, index), scale


def decode_fp4(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of nibble codes (uint8)."""
    magnitude = torch.tensor(E2M1, device=codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [..., K] -> uint8 [..., ceil(K/2)], two a byte (low nibble first, zero padded)."""
    if codes.dtype != torch.uint8 or codes.dim() < 1 or (codes.numel() and int(codes.max()) > 15):
        raise ValueError(f"pack_fp4: codes must be a uint8 tensor [..., K] of nibbles in 0..15, got {codes.dtype} "
                         f"of shape {tuple(codes.shape)}")
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(k/2)] -> uint8 nibbles [..., k]: the inverse of pack_fp4."""
    if packed.dtype != torch.uint8 or packed.dim() < 1 or packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_fp4: packed must be a uint8 tensor [..., ceil(k/2) = {(k + 1) // 2}], got "
                         f"{packed.dtype} of shape {tuple(packed.shape)}")
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return codes[..., :k]
