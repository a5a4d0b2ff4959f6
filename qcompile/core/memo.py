"""The results of a pipeline's expensive steps, kept so that a saved artifact can replay it.

Given a graph and its calibration statistics the pipeline is deterministic, and most of it is
cheap (scales, rotations, folding, round-to-nearest). A few steps are not: GPTQ weight rounding
and the searches for migration scales and clipping ratios. A pass runs those through
`memoized`::

    codes, w_step = memoized(gm, "gptq", stem, (weight, w_bits),
                             lambda: gptq.quantize_gptq(weight, stats.gram, w_bits))

which records the result in the graph module's memo (`gm.meta["q4_memo"]`) under a key made of
the step's kind, the linear's name and the step's other (non-tensor) arguments, with a
`Fingerprint` of each tensor input: its dtype, shape and a few float64 summaries (norms and
signed sums). The calibration statistics are not in the key: a compile has one set of them,
and a saved artifact keeps them. `qcompile.quantize` saves the memo with the statistics;
loading runs the pipeline again with the memo given back, so every expensive step is looked up
instead of computed.

Why fingerprints and not a hash of the exact bytes: the tensors a step receives come out of
cheap float steps run again at load (migration scales folded, rotations applied), and on
another machine (another thread count, torch version or CPU kind) their last bits can differ.
A lookup hits when every input's summaries agree within `tolerance(dtype)` (1e-4 relative for
float32: a few ulps of every element pass by orders of magnitude, a different weight does not)
and gives back the saved result, bit for bit. A loaded memo is strict: a key it lacks, or
inputs beyond the tolerance, raise `MemoMiss` saying which input differs and by how much, as
that means the model or the pipeline is not the one that was saved (never a silent
recomputation, which might need statistics the artifact does not hold). What the cheap steps
then compute from the results (steps, folded scales) is made bit-exact by the artifact, which
saves the final graphs' constants and puts them back (`qcompile.frontend.saved_artifact`).

Without a memo in `gm.meta` (a pass run on its own, in a test), `memoized` just computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx

from .memory import ConstantPool

__all__ = ["MEMO", "Entry", "Fingerprint", "Memo", "MemoMiss", "memoized", "replaying", "tensor_hash", "tolerance"]

MEMO = "q4_memo"


class MemoMiss(LookupError):
    """A strict (loaded) memo has no result for a step the pipeline asked for, or has one
    computed from other inputs."""


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tolerance(dtype: torch.dtype) -> float:
    """The relative difference two computations of one value may show and still count as the
    same: 1e-4, or 4 ulps of a half-precision dtype (whose one ulp is already above 1e-4); 1e-2
    for integers (codes rounded from floats: a near-tie may round the other way)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-2


# what each summary of a fingerprint is compared relative to: the L1 norm, or itself
_SUMMARIES = ("L1 norm", "L2 norm", "largest magnitude", "sum", "alternating sum", "scrambled-sign sum")
_SCALE = (0, 1, 2, 0, 0, 0)
# the signed sums' signs, by position modulo an even period (so the alternating one alternates):
# one reduction of the tensor viewed as rows of this period gives every signed sum
_PERIOD = 1024
_SIGNS = torch.stack([torch.ones(_PERIOD, dtype=torch.float64),
                      1 - 2 * (torch.arange(_PERIOD) & 1).double(),
                      1 - 2 * ((torch.arange(_PERIOD) * 2654435761 >> 13) & 1).double()])  # fixed pseudo-random


_CHUNK = 1 << 22  # elements summed in float64 at once


def _summarize(t: torch.Tensor) -> tuple[float, ...]:
    x = t.detach().reshape(-1).to("cpu")
    if not x.is_floating_point():
        x = x.double()  # codes, indices, masks: summed exactly
    if not x.numel():
        return (0.0,) * len(_SUMMARIES)
    whole = x.numel() // _PERIOD * _PERIOD
    # Every float64 reduction a chunk at a time: each converts its whole input first (a whole
    # lm_head, 49152 x 576, made a 217 MiB copy). A tensor of one chunk is summed as before.
    rows = x[:whole].view(-1, _PERIOD).split(_CHUNK // _PERIOD)
    columns = torch.cat([sum(r.sum(0, dtype=torch.float64) for r in rows) if rows else
                         torch.zeros(_PERIOD, dtype=torch.float64), torch.zeros(_PERIOD, dtype=torch.float64)])
    columns[_PERIOD:_PERIOD + x.numel() - whole] = x[whole:].double()  # the last, partial row
    columns = columns.view(2, _PERIOD).sum(0)
    chunks = x.split(_CHUNK)
    l1 = sum(torch.linalg.vector_norm(c, 1, dtype=torch.float64) for c in chunks)
    l2 = torch.linalg.vector_norm(x, 2, dtype=torch.float64) if len(chunks) == 1 else \
        sum(torch.linalg.vector_norm(c, 2, dtype=torch.float64) ** 2 for c in chunks).sqrt()
    largest = max(torch.linalg.vector_norm(c, math.inf, dtype=torch.float64) for c in chunks)
    return tuple(float(v) for v in (l1, l2, largest, *(_SIGNS @ columns)))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a memo entry remembers of one tensor input: enough to tell last-bit differences
    (which pass) from another tensor (which does not), in a few numbers."""

    dtype: str
    shape: tuple[int, ...]
    summary: tuple[float, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> Fingerprint:
        return cls(str(t.dtype).removeprefix("torch."), tuple(t.shape), _summarize(t))

    def mismatch(self, saved: Fingerprint) -> str | None:
        """Why this input is not the one `saved` was taken of; None when it is (within tolerance)."""
        if (self.dtype, self.shape) != (saved.dtype, saved.shape):
            return f"{self.dtype} {list(self.shape)}, saved {saved.dtype} {list(saved.shape)}"
        rtol = tolerance(getattr(torch, self.dtype))
        for what, scale, ours, theirs in zip(_SUMMARIES, _SCALE, self.summary, saved.summary):
            if ours == theirs or (math.isnan(ours) and math.isnan(theirs)):
                continue
            bound = rtol * abs(saved.summary[scale])
            if not abs(ours - theirs) <= bound:  # NaN fails too
                relative = abs(ours - theirs) / abs(saved.summary[scale]) if saved.summary[scale] else math.inf
                return (f"its {what} is {ours:.9g}, saved {theirs:.9g} (relative difference {relative:.2g}, "
                        f"tolerance {rtol:.2g})")
        return None

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "summary": list(self.summary)}

    @classmethod
    def from_json(cls, entry: dict) -> Fingerprint:
        return cls(entry["dtype"], tuple(entry["shape"]), tuple(float(v) for v in entry["summary"]))


@dataclasses.dataclass
class Entry:
    """One result of a step (a tuple of tensors; numbers as 0-d float64 tensors) and the
    fingerprints of the tensors it was computed from, in order."""

    inputs: tuple[Fingerprint, ...]
    result: tuple[torch.Tensor, ...]

    def mismatch(self, inputs: Sequence[Fingerprint]) -> str | None:
        if len(inputs) != len(self.inputs):
            return f"{len(inputs)} tensor inputs, saved {len(self.inputs)}"
        for i, (ours, saved) in enumerate(zip(inputs, self.inputs)):
            why = ours.mismatch(saved)
            if why is not None:
                return f"tensor input {i} ({saved.dtype} {list(saved.shape)}) differs: {why}"
        return None


class Memo:
    """Entries by key (the step's kind, the linear's name and its non-tensor arguments); a key
    holds more than one entry only when one process met the step with other tensor inputs."""

    def __init__(self, entries: dict[str, list[Entry]] | None = None, strict: bool = False):
        self.entries = {key: list(found) for key, found in (entries or {}).items()}
        self.strict = strict
        # the model's graphs share equal constants (a recompile's packed weights): memory.ConstantPool
        self.constants = ConstantPool()

    def get_or_compute(self, key: str, inputs: Sequence[Fingerprint], compute: Callable[[], tuple]) -> tuple:
        found = self.entries.get(key, [])
        for entry in found:
            if entry.mismatch(inputs) is None:
                return entry.result
        if self.strict:
            if not found:
                raise MemoMiss(f"no saved result for {key}")
            raise MemoMiss(f"the saved result for {key} was computed from other inputs: {found[0].mismatch(inputs)}")
        entry = Entry(tuple(inputs), tuple(_as_tensor(v) for v in compute()))
        self.entries.setdefault(key, []).append(entry)
        return entry.result


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.tensor(float(value), dtype=torch.float64)


def _flatten(inputs: Sequence[Any]) -> Iterator[Any]:
    for value in inputs:
        if isinstance(value, (list, tuple)):
            yield "("
            yield from _flatten(value)
            yield ")"
        else:
            yield value


def _key(kind: str, name: str, inputs: Sequence[Any]) -> tuple[str, tuple[Fingerprint, ...]]:
    """The entry key (tensors by position only: their contents are compared by fingerprint) and
    the tensors' fingerprints."""
    h, fingerprints = hashlib.sha256(), []
    for value in _flatten(inputs):
        if isinstance(value, torch.Tensor):
            fingerprints.append(Fingerprint.of(value))
            value = "<tensor>"
        h.update(repr(value).encode() + b"|")
    return f"{kind}/{name}/{h.hexdigest()[:16]}", tuple(fingerprints)


def memoized(gm: fx.GraphModule, kind: str, name: str, inputs: Sequence[Any],
             compute: Callable[[], tuple]) -> tuple:
    """`compute()` (a tuple of tensors and numbers), through `gm`'s memo when it has one.

    `inputs` must hold everything the result depends on: tensors (compared by fingerprint) and
    the other arguments (compared exactly, in the key). Numbers in the result come back as 0-d
    tensors: call `float()` on them."""
    memo = gm.meta.get(MEMO)
    if memo is None:
        return tuple(_as_tensor(v) for v in compute())
    key, fingerprints = _key(kind, name, inputs)
    result = memo.get_or_compute(key, fingerprints, compute)
    # on the inputs' device: a loaded artifact's results are read onto the CPU, the model may be on a GPU
    device = next((v.device for v in _flatten(inputs) if isinstance(v, torch.Tensor)), None)
    return result if device is None else tuple(t.to(device) for t in result)


def replaying(gm: fx.GraphModule) -> bool:
    """Is `gm` being compiled from a saved artifact (its memo strict)? Then statistics only an
    expensive step reads (GPTQ's Gram matrices) are absent, and the memo holds the results."""
    memo = gm.meta.get(MEMO)
    return memo is not None and memo.strict
