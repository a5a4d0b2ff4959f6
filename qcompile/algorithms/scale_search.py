"""Searching quantization parameters against a layer's output error on calibration samples.

MergeQuant's adaptive clipping and the migration strength of QSM are chosen the same way: try
candidates, fake-quantize the layer with each, and keep the one whose output on the calibration
token samples is closest to the float output. Everything here is plain torch on small samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qcompile.kernels import formats
from qcompile.kernels.rotation import rotate as rotation_op

# Clipping ratios of the static activation step tried by the searches (1.0: the calibration absmax).
# They reach down to 0.1: heavy-tailed inputs (down_proj's act(gate) * up) are best served by
# clipping most of their range at 4 bits (SmolLM2: down_proj SQNR 5.7 dB at clip >= 0.5, 9.7 dB
# at 0.15).
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


# Weight rows measured at once by an output error (`output_error` here, `learn_rotation`'s): rows
# round independently. The head's clip search on SmolLM2's lm_head (49152 x 576) whole made
# ~400 MiB of float32 temporaries per clip, the peak of its whole quantization; a weight of fewer
# rows is one block, measured as before to the bit.
BLOCK_ROWS = 4096


def fake_quant_weight(weight: torch.Tensor, bits: int, fmt: str = formats.INT) -> torch.Tensor:
    """Per-output-channel symmetric round-to-nearest, dequantized (what the kernel computes with)."""
    codes, step = formats.quantize_weight_per_channel(weight, fmt, bits)
    return codes.float() * step[:, None]


def fake_quant_activation(x: torch.Tensor, absmax: float, clip: float, bits: int,
                          fmt: str = formats.INT) -> torch.Tensor:
    """Static per-tensor symmetric quantization with step clip * absmax / max_value, dequantized."""
    step = max(clip * absmax, 1e-12) / formats.max_value(fmt, bits)
    return formats.round_to_format(x / step, fmt, bits) * step


def output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: torch.Tensor, clip: float,
                 w_bits: int, a_bits: int, rotation: Sequence[torch.Tensor] | None = None) -> float:
    """Squared error of the quantized outputs of every linear reading x, after migrating `scales`.

    Float reference: x @ W.T. Quantized: Q_a(x / s) @ Q_w(W * s).T, with the activation step
    from the migrated samples' absmax times `clip`. With `rotation` (the factors of R, see
    `qcompile/kernels/rotation.py`), as rotate-inputs leaves the linears: Q_a((x / s) R) @ Q_w((W * s) R).T.
    """
    rotate = (lambda t: t) if rotation is None else (lambda t: rotation_op(t, list(rotation)))  # noqa: E731
    migrated = rotate(x / scales)
    xq = fake_quant_activation(migrated, migrated.abs().max().item(), clip, a_bits)
    error = 0.0
    for w in weights:  # rows round independently: a block of rows at a time
        for rows in w.split(BLOCK_ROWS):
            reference = x @ rows.float().t()
            approx = xq @ fake_quant_weight(rotate(rows.float() * scales), w_bits).t()
            error += (reference - approx).pow(2).sum().item()
    return error


def search_formats(x: torch.Tensor, weight: torch.Tensor, w_formats: Sequence[str], a_formats: Sequence[str],
                   clips: Sequence[float], w_bits: int, a_bits: int, rounds: int = 2) -> tuple[str, str, float, float]:
    """(weight format, activation format, activation clip, error): LLM-FP4's per-layer search.

    Minimizes the layer-output error ||x W^T - Q_a(x) Q_w(W)^T||^2 on the samples, alternating: the
    weight's format first (against float activations), then the activation's format and clipping
    ratio against the quantized weight, then the weight's again against the quantized
    activation, `rounds` times. Weights are rounded to nearest per row (GPTQ comes after the choice);
    each candidate's dequantized weight and activation is computed once. Bits apply to `int`
    (the float formats are 4-bit).
    """
    w = weight.float()
    reference = x @ w.t()
    absmax = x.abs().max().item()
    dequantized = {fmt: fake_quant_weight(w, w_bits if fmt == formats.INT else 4, fmt) for fmt in w_formats}
    activations: dict[tuple[str, float], torch.Tensor] = {}

    def quantized_x(fmt: str, clip: float) -> torch.Tensor:
        if (fmt, clip) not in activations:
            activations[fmt, clip] = fake_quant_activation(x, absmax, clip, a_bits if fmt == formats.INT else 4, fmt)
        return activations[fmt, clip]

    def error(xq: torch.Tensor, w_fmt: str) -> float:
        return (reference - xq @ dequantized[w_fmt].t()).pow(2).sum().item()

    w_fmt = min(w_formats, key=lambda f: error(x, f))
    a_fmt, clip, best = a_formats[0], 1.0, float("inf")
    for _ in range(rounds):
        best, a_fmt, clip = min((error(quantized_x(f, c), w_fmt), f, c) for f in a_formats for c in clips)
        best, w_fmt = min((error(quantized_x(a_fmt, clip), f), f) for f in w_formats)
    return w_fmt, a_fmt, clip, best


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

