"""The packed int4 weight format: two signed 4-bit codes a byte along K, and a per-row step.

    w[n, k] ~= codes[n, k] * step[n]          codes int8 in [-8, 7], step float32 [N]
    packed[n, j] = (codes[n, 2j] & 0xF) | ((codes[n, 2j + 1] & 0xF) << 4)     uint8 [N, ceil(K / 2)]

The low nibble holds the even k, the high nibble the odd k, both as 4-bit two's complement; an
odd K is padded with a zero high nibble. 2- and 3-bit codes use the same container (their
values are a subset of [-8, 7]), so the stored weight is K / 2 bytes a row whatever the bits.
"""

from __future__ import annotations

import sys

import torch

SUPPORTED_BITS = (2, 3, 4)

# unpack_int4 writes each output byte pair as one int16 and reinterprets it as two int8s: the
# first (lower-address) byte is the low half of the int16 only on a little-endian machine.
_LITTLE_ENDIAN = sys.byteorder == "little"


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> uint8 [N, ceil(K / 2)], two codes a byte along K.

    packed[n, j] = (codes[n, 2j] & 0xF) | (codes[n, 2j + 1] & 0xF) << 4, with codes[n, K] = 0
    when K is odd. `unpack_int4(pack_int4(c), K) == c`.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"pack_int4: codes must be a 2-D int8 tensor [N, K] with values in [-8, 7], "
                        f"got {_describe(codes)}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -8 or hi > 7:
            raise ValueError(f"pack_int4: codes must be int8 with values in [-8, 7], got min {lo}, max {hi}")
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    nibbles = codes.view(torch.uint8) & 0xF  # two's complement: the low 4 bits are the code
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(k / 2)] -> int8 codes [N, k]: the exact inverse of `pack_int4`.

    Sign extension by arithmetic shifts on the int8 view b of each byte:
        codes[n, 2j] = (b << 4) >> 4          codes[n, 2j + 1] = b >> 4
    For odd k the result is a view of the first k columns of [N, k + 1] (rows stay contiguous).
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"unpack_int4: packed must be a 2-D uint8 tensor [N, ceil(k/2)], got {_describe(packed)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"unpack_int4: k must be an int >= 0, got {k!r}")
    if packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: packed must have ceil(k/2) = {(k + 1) // 2} bytes a row for k={k}, "
                         f"got {packed.shape[1]}")
    n, kp = packed.shape
    b = packed.view(torch.int8)
    low = b << 4
    low >>= 4
    high = b >> 4
    if _LITTLE_ENDIAN:
        # Interleave without a strided int8 write (which torch does ~10x slower than a
        # contiguous one): the int16 high * 256 + (low & 0xFF) holds the bytes (low, high) in
        # memory order. uint8 + int8 promotes to int16, so this is a single elementwise pass.
        out = torch.add(low.view(torch.uint8), high, alpha=256).view(torch.int8).view(n, 2 * kp)
    else:
        out = torch.stack((low, high), dim=-1).view(n, 2 * kp)
    return out if 2 * kp == k else out[:, :k]


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a float weight [N, K].

        qmax = 2**(bits-1) - 1          step[n] = max_k |w[n, k]| / qmax          (float32 [N])
        codes[n, k] = clamp(round(w[n, k] / step[n]), -qmax - 1, qmax)         (int8 [N, K])

    `round` is round-half-to-even (torch.round). A row of zeros gets step 1 (its codes are 0), never
    a division by zero. The arithmetic is done in float32 whatever the weight's dtype.
    """
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize_weight_per_channel: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"quantize_weight_per_channel: weight must be a 2-D float tensor [N, K], "
                        f"got {_describe(weight)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_weight_per_channel: weight must be finite, got NaN or inf values")
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(dim=1) / qmax if w.shape[1] else w.new_zeros(w.shape[0])
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.round(w / step[:, None]), -qmax - 1, qmax).to(torch.int8)
    return codes, step
