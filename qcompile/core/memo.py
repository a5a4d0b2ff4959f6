"""The results of a pipeline's expensive steps, kept so that a saved artifact can replay it.

Given a graph and its calibration statistics the pipeline is deterministic, and most of it is
cheap (scales, rotations, folding, round-to-nearest). A few steps are not: GPTQ weight rounding
and the searches for migration scales and clipping ratios. A pass runs those through
`memoized`::

    codes, w_step = memoized(gm, "gptq", stem, (weight, w_bits),
                             lambda: gptq.quantize_gptq(weight, stats.gram, w_bits))

which records the result in the graph module's memo (`gm.meta["q4_memo"]`) under a key made of
the step's kind, the linear's name and a hash of its inputs (the weight and the scalars; not the
calibration statistics, which a compile has one set of and a saved artifact keeps). `qcompile.quantize`
saves the memo with the calibration statistics; loading runs the pipeline again with the memo
given back, so every expensive step is looked up instead of computed, and the result is the
same to the bit. A loaded memo is strict: a key it lacks raises `MemoMiss`, as it means the
model or the pipeline is not the one that was saved (never a silent recomputation, which
might need statistics the artifact does not hold).

Without a memo in `gm.meta` (a pass run on its own, in a test), `memoized` just computes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

__all__ = ["MEMO", "Memo", "MemoMiss", "memoized", "replaying", "tensor_hash"]

MEMO = "q4_memo"


class MemoMiss(LookupError):
    """A strict (loaded) memo has no result for a step the pipeline asked for."""


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _digest(inputs: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for value in inputs:
        if isinstance(value, torch.Tensor):
            h.update(tensor_hash(value).encode())
        elif isinstance(value, (list, tuple)):
            h.update(_digest(value).encode())
        else:
            h.update(repr(value).encode())
        h.update(b"|")
    return h.hexdigest()[:24]


class Memo:
    """Results by key; each a tuple of tensors (scalars are stored as 0-d float64 tensors)."""

    def __init__(self, entries: dict[str, tuple[torch.Tensor, ...]] | None = None, strict: bool = False):
        self.entries = dict(entries or {})
        self.strict = strict

    def get_or_compute(self, key: str, compute: Callable[[], tuple]) -> tuple:
        if key not in self.entries:
            if self.strict:
                raise MemoMiss(f"no saved result for {key}")
            self.entries[key] = tuple(_as_tensor(v) for v in compute())
        return tuple(self.entries[key])


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.tensor(float(value), dtype=torch.float64)


def memoized(gm: fx.GraphModule, kind: str, name: str, inputs: Sequence[Any],
             compute: Callable[[], tuple]) -> tuple:
    """`compute()` (a tuple of tensors and numbers), through `gm`'s memo when it has one.

    `inputs` must hold everything the result depends on (tensors are hashed by content). Numbers
    in the result come back as 0-d tensors: call `float()` on them."""
    memo = gm.meta.get(MEMO)
    if memo is None:
        return tuple(_as_tensor(v) for v in compute())
    return memo.get_or_compute(f"{kind}/{name}/{_digest(inputs)}", compute)


def replaying(gm: fx.GraphModule) -> bool:
    """Is `gm` being compiled from a saved artifact (its memo strict)? Then statistics only an
    expensive step reads (GPTQ's Gram matrices) are absent, and the memo holds the results."""
    memo = gm.meta.get(MEMO)
    return memo is not None and memo.strict
