"""Calibration: run the frozen ATen graph on calibration batches and observe linear inputs.

For every `aten.linear` whose weight is a frozen constant, an observer records per-input-channel
statistics of the activation the linear reads (absmax over all tokens). The statistics are keyed
by the weight's parameter name (`q4_fqn`), so a Dynamo recompile of the same model (a new
sequence length, say) finds them in the cache and does not calibrate again.

Two ways to observe:
- `observe(gm, batches)` runs the captured graph itself on graph inputs: used for the first call's
  inputs when no calibration data is given (they fit the graph by construction);
- `observe_model(module, batches, watched)` runs the user's module eagerly on calibration batches
  (dicts of keyword arguments or tuples of positional ones) and watches `F.linear` calls by their
  weight: batches of any length calibrate, and one run covers every graph of the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.overrides import TorchFunctionMode

from qcompile.core import ir


class CalibrationError(ValueError):
    """Calibration data is unusable: empty, non-finite, or not fitting the model's signature."""


# The robust range of a channel: this quantile of |x| over the tokens of a batch (99%: with
# 512-token batches a 99.9% quantile would be the max itself). An outlier
# channel stands out in absmax *and* in this percentile; a single spike only in absmax.
ROBUST_QUANTILE = 0.99
# Token rows kept per activation (a uniform sample over all calibration tokens): passes that
# search scales or clipping measure a layer's output error on them.
SAMPLE_ROWS = 256


@dataclasses.dataclass
class ChannelStats:
    """Statistics of one activation tensor, per channel of its last dimension.

    `absmax` is the max of |x| over all tokens; `robust` the max over batches of the per-batch
    99th percentile of |x| (a spike in a few tokens does not move it); `samples` up to
    SAMPLE_ROWS token rows drawn uniformly from all tokens seen (reservoir sampling, seeded).
    """

    absmax: torch.Tensor  # float32 [channels]
    robust: torch.Tensor  # float32 [channels]
    samples: torch.Tensor  # float32 [<= SAMPLE_ROWS, channels]
    num_tokens: int = 0
    # sum of x^T x over all tokens, float32 [channels, channels]; only when a pass needs it
    # (GPTQ weight rounding), as it costs channels**2 floats per linear
    gram: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        flat = rows.abs()
        self.absmax = torch.maximum(self.absmax, flat.amax(dim=0))
        k = max(1, math.ceil(ROBUST_QUANTILE * flat.shape[0]))
        self.robust = torch.maximum(self.robust, flat.kthvalue(k, dim=0).values)
        self._sample(rows)
        if self.gram is not None:
            self.gram.addmm_(rows.t(), rows)
        self.num_tokens += flat.shape[0]

    def _sample(self, rows: torch.Tensor) -> None:
        """Keep a uniform sample of all rows seen: each new row replaces a kept one with
        probability SAMPLE_ROWS / (rows seen so far), as in reservoir sampling."""
        g = torch.Generator().manual_seed(self.num_tokens)
        seen = self.num_tokens + torch.arange(1, rows.shape[0] + 1)
        keep = torch.rand(rows.shape[0], generator=g) * seen < SAMPLE_ROWS
        chosen = rows[keep]
        free = SAMPLE_ROWS - self.samples.shape[0]
        self.samples = torch.cat([self.samples, chosen[:free]])
        replace = chosen[free:][-SAMPLE_ROWS:]
        if replace.shape[0]:
            slots = torch.randperm(SAMPLE_ROWS, generator=g)[: replace.shape[0]]
            self.samples[slots] = replace

    @classmethod
    def empty(cls, channels: int, gram: bool = False) -> "ChannelStats":
        zeros = torch.zeros(channels, dtype=torch.float32)
        return cls(absmax=zeros, robust=zeros.clone(), samples=torch.zeros(0, channels),
                   gram=torch.zeros(channels, channels) if gram else None)

    def rotated(self, factors: list[torch.Tensor]) -> "ChannelStats":
        """The statistics of x @ R, R = kron(*factors) orthogonal (`kernels/rotation.py`). Samples
        and the Gram matrix (R^T G R) rotate exactly; per-channel ranges come from the rotated
        samples, as the full calibration set was only observed unrotated."""
        from qcompile.kernels.rotation import rotate

        samples = rotate(self.samples, factors) if self.samples.shape[0] else self.samples
        if samples.shape[0]:
            flat = samples.abs()
            absmax = flat.amax(dim=0)
            robust = flat.kthvalue(max(1, math.ceil(ROBUST_QUANTILE * flat.shape[0])), dim=0).values
        else:
            absmax, robust = self.absmax, self.robust
        gram = None if self.gram is None else rotate(rotate(self.gram, factors).t().contiguous(), factors).t()
        return dataclasses.replace(self, absmax=absmax, robust=robust, samples=samples, gram=gram)

    def scaled(self, scales: torch.Tensor) -> "ChannelStats":
        """The statistics of x / scales (per channel), as a migration leaves the input."""
        gram = None if self.gram is None else self.gram / torch.outer(scales, scales)
        return dataclasses.replace(self, absmax=self.absmax / scales, robust=self.robust / scales,
                                   samples=self.samples / scales, gram=gram)


def observed_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The linear nodes whose weight is a frozen constant: the ones quantization can touch."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target is ir.aten.linear.default
        and ir.get_constant(gm, n.args[1]) is not None
    ]


class _Observer(fx.Interpreter):
    """Runs the graph and feeds each observed linear's input into its ChannelStats."""

    def __init__(self, gm: fx.GraphModule, stats: dict[fx.Node, ChannelStats]):
        super().__init__(gm)
        self.stats = stats

    def run_node(self, n: fx.Node) -> Any:
        if n in self.stats:
            x = self.env[n.args[0]]
            if not torch.isfinite(x).all():
                raise CalibrationError(
                    f"non-finite activation reaches {ir.describe(n)}; the model produces NaN/inf "
                    "on this calibration batch"
                )
            self.stats[n].update(x)
        return super().run_node(n)


def observe(
    gm: fx.GraphModule,
    batches: Iterable[Sequence[Any]],
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    gram: bool = False,
) -> dict[fx.Node, ChannelStats]:
    """Run `gm` on each batch of graph inputs; return the stats of every observed linear
    (with Gram matrices if `gram`)."""
    stats = {n: ChannelStats.empty(ir.get_constant(gm, n.args[1]).shape[1], gram) for n in observed_linears(gm)}
    observer = _Observer(gm, stats)
    count = 0
    with torch.no_grad():
        for index, inputs in enumerate(progress(batches)):
            try:
                observer.run(*inputs)
            except CalibrationError as e:
                raise CalibrationError(f"calibration batch {index}: {e}") from None
            count += 1
    if count == 0:
        raise CalibrationError("the calibration iterable is empty: give at least one batch")
    return stats


# --- calibration batches: the user's model, run eagerly ------------------------------------------


class _LinearInputObserver(TorchFunctionMode):
    """Feeds the input of every `F.linear` whose weight is watched into that weight's stats."""

    def __init__(self, watched: dict[int, str], stats: dict[str, ChannelStats]):
        super().__init__()
        self.watched = watched  # id(weight parameter) -> its name
        self.stats = stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            name = self.watched.get(id(weight))
            if name is not None:
                if not torch.isfinite(x).all():
                    raise CalibrationError(f"non-finite activation reaches the linear of {name!r}")
                self.stats[name].update(x)
        return func(*args, **kwargs)


def _split_batch(batch: Any, index: int) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise CalibrationError(
        f"calibration batch {index} is a {type(batch).__name__}; expected a dict of keyword "
        "arguments or a tuple of positional arguments of the model"
    )


def observe_model(
    module: torch.nn.Module,
    batches: Iterable[Any],
    watched: dict[torch.Tensor, str],
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    gram: bool = False,
) -> dict[str, ChannelStats]:
    """Run the user's module eagerly on each batch; return {weight name: stats of its input}.

    Running the module itself (not the captured graph) lets batches of any shape calibrate a
    graph specialized to another, and covers every graph of a model with graph breaks.
    `watched` maps weight parameters to their names; the module is only read, never written.
    """
    stats = {name: ChannelStats.empty(w.shape[1], gram) for w, name in watched.items()}
    observer = _LinearInputObserver({id(w): name for w, name in watched.items()}, stats)
    signature = inspect.signature(module.forward)
    count = 0
    with torch.no_grad():
        for index, batch in enumerate(progress(batches)):
            args, kwargs = _split_batch(batch, index)
            try:
                signature.bind(*args, **kwargs)
            except TypeError as e:
                raise CalibrationError(
                    f"calibration batch {index} does not fit the model's signature "
                    f"{type(module).__name__}.forward{signature}: {e}"
                ) from None
            for name, value in [*enumerate(args), *kwargs.items()]:
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    raise CalibrationError(f"calibration batch {index}: argument {name!r} holds NaN or inf")
            try:
                with observer:
                    module(*args, **kwargs)
            except CalibrationError as e:
                raise CalibrationError(f"calibration batch {index}: {e}") from None
            except Exception as e:  # noqa: BLE001 - name the batch, keep the model's own error
                unnamed = [k for k in kwargs if k not in signature.parameters]
                hint = (f" (note: {', '.join(map(repr, unnamed))} is not a named argument of "
                        f"{type(module).__name__}.forward)") if unnamed else ""
                raise CalibrationError(
                    f"calibration batch {index}: the model raised {type(e).__name__}: {e}{hint}"
                ) from e
            count += 1
    if count == 0:
        raise CalibrationError("the calibration iterable is empty: give at least one batch")
    return stats
