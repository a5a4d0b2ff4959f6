"""Searching quantization parameters against a layer's output error on calibration samples.

MergeQuant's adaptive clipping and the migration strength of QSM are chosen the same way: try
candidates, fake-quantize the layer with each, and keep the one whose output on the calibration
token samples is closest to the float output. Everything here is plain torch on small samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qcompile.kernels import int4
from qcompile.kernels.rotation import rotate as rotation_op

# Clipping ratios of the static activation step tried by the searches (1.0: the calibration absmax).
# They reach down to 0.1: heavy-tailed inputs (down_proj's act(gate) * up) are best served by
# clipping most of their range at 4 bits (SmolLM2: down_proj SQNR 5.7 dB at clip >= 0.5, 9.7 dB
# at 0.15).
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


def fake_quant_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric round-to-nearest, dequantized (what the kernel computes with)."""
    codes, step = int4.quantize_weight_per_channel(weight, bits)
    return codes.float() * step[:, None]


def fake_quant_activation(x: torch.Tensor, absmax: float, clip: float, bits: int) -> torch.Tensor:
    """Static per-tensor symmetric quantization with step clip * absmax / qmax, dequantized."""
    qmax = 2 ** (bits - 1) - 1
    step = max(clip * absmax, 1e-12) / qmax
    return torch.clamp(torch.round(x / step), -qmax - 1, qmax) * step


def output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: torch.Tensor, clip: float,
                 w_bits: int, a_bits: int, rotation: Sequence[torch.Tensor] | None = None) -> float:
    """Squared error of the quantized outputs of every linear reading x, after migrating `scales`.

    Float reference: x @ W.T. Quantized: Q_a(x / s) @ Q_w(W * s).T, with the activation step
    from the migrated samples' absmax times `clip`. With `rotation` (the factors of R, see
    `kernels/rotation.py`), as rotate-inputs leaves the linears: Q_a((x / s) R) @ Q_w((W * s) R).T.
    """
    rotate = (lambda t: t) if rotation is None else (lambda t: rotation_op(t, list(rotation)))  # noqa: E731
    migrated = rotate(x / scales)
    xq = fake_quant_activation(migrated, migrated.abs().max().item(), clip, a_bits)
    error = 0.0
    for w in weights:
        reference = x @ w.float().t()
        approx = xq @ fake_quant_weight(rotate(w.float() * scales), w_bits).t()
        error += (reference - approx).pow(2).sum().item()
    return error


def search_migration(x: torch.Tensor, weights: Sequence[torch.Tensor], candidates: Sequence[torch.Tensor],
                     clips: Sequence[float], w_bits: int, a_bits: int, rounds: int = 2,
                     rotation: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """(scales, clip) minimizing `output_error`: alternate a search over the candidate scale
    vectors at the current clip with a search over clips at the current scales."""
    clip, scales = 1.0, candidates[0]
    for _ in range(rounds):
        errors = [output_error(x, weights, s, clip, w_bits, a_bits, rotation) for s in candidates]
        scales = candidates[min(range(len(candidates)), key=errors.__getitem__)]
        clip, _ = search_clip(x, weights, scales, clips, w_bits, a_bits, rotation)
    return scales, clip


def search_clip(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: torch.Tensor, clips: Sequence[float],
                w_bits: int, a_bits: int, rotation: Sequence[torch.Tensor] | None = None) -> tuple[float, float]:
    """(best clip ratio, its error) for fixed scales."""
    errors = [(output_error(x, weights, scales, c, w_bits, a_bits, rotation), c) for c in clips]
    best_error, best_clip = min(errors)
    return best_clip, best_error

