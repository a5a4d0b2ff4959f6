"""Accuracy measures: perplexity of a language model, cosine similarity of embeddings, SQNR of a
quantized tensor (explain's per-linear measure). Shared by explain, the accuracy table, the
examples and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm


def perplexity(model: Callable, windows: Iterable[torch.Tensor], progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean next-token negative log-likelihood) over independent windows of input_ids.

    Windows are independent prefills: no KV cache is asked for (use_cache=False), which also lets
    migrate-scales reach o_proj through v_proj (a returned cache would be an output it changes).
    """
    windows = list(windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1], ids[0, 1:], reduction="sum"
            )
            nll += loss.item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of L2-normalized rows `a` and `b` (sentence
    embeddings against their FP32 reference)."""
    return (a * b).sum(-1).mean().item()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2), in float64;
    inf when they are equal, -inf when the reference is zero and they differ."""
    ref = reference.double()
    signal = ref.square().sum().item()
    noise = (ref - approx.double()).square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| in float64 (the exactness checks' measure); 0 for
    empty tensors, inf when `expected` is all zeros and `got` is not."""
    if not expected.numel():
        return 0.0
    diff = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
