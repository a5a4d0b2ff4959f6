"""The packed int4 weight format: two signed 4-bit codes a byte along K, and a per-row step.

    w[n, k] ~= codes[n, k] * step[n]          codes in [-8, 7], step float32 [N]
    packed[n, j] = (codes[n, 2j] & 0xF) | (codes[n, 2j + 1] << 4)       uint8 [N, ceil(K / 2)]

The low nibble holds the even k, the high nibble the odd k, both as 4-bit two's complement; an
odd K is padded with a zero high nibble. 2- and 3-bit codes use the same container.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)


def _check_codes(codes: torch.Tensor) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(
            f"pack_int4: codes must be a 2-D int8 tensor [N, K], got "
            f"{getattr(codes, 'dtype', type(codes).__name__)} of shape {tuple(getattr(codes, 'shape', ()))}"
        )
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(
            f"pack_int4: codes must hold values in [-8, 7], got [{int(codes.min())}, {int(codes.max())}]"
        )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> uint8 [N, ceil(K / 2)], two codes a byte along K."""
    _check_codes(codes)
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    nibbles = codes.view(torch.uint8) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(k / 2)] -> int8 codes [N, k]: the exact inverse of `pack_int4`.

    Sign extension by arithmetic shifts on an int8 view: low = (b << 4) >> 4, high = b >> 4,
    written straight into the interleaved output (no stack, no extra copy).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"unpack_int4: packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: packed has {packed.shape[1]} bytes a row, K={k} needs {(k + 1) // 2}")
    signed = packed.view(torch.int8)
    out = torch.empty(packed.shape[0], packed.shape[1], 2, dtype=torch.int8, device=packed.device)
    torch.bitwise_left_shift(signed, 4, out=out[..., 0])
    out[..., 0] >>= 4
    torch.bitwise_right_shift(signed, 4, out=out[..., 1])
    out = out.view(packed.shape[0], -1)
    return out if out.shape[1] == k else out[:, :k]


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a float weight [N, K].

    step[n] = max_k |w[n, k]| / qmax (qmax = 2**(bits-1) - 1); codes = clamp(round(w / step),
    -qmax - 1, qmax). A row of zeros gets step 1 (its codes are 0), never a division by zero.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize_weight_per_channel: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"quantize_weight_per_channel: weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("quantize_weight_per_channel: weight holds NaN or inf")
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(dim=1) / qmax
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.round(w / step[:, None]), -qmax - 1, qmax).to(torch.int8)
    return codes, step
