"""Calibration: run the frozen ATen graph on calibration batches and observe linear inputs.

For every `aten.linear` whose weight is a frozen constant, an observer records per-input-channel
statistics of the activation the linear reads (`ChannelStats`). The statistics are cached by the
weight's parameter (`CalibrationCache`), so a Dynamo recompile of the same model (a new
sequence length, say) finds them and does not calibrate again.

Two ways to observe:
- `observe(gm, batches)` runs the captured graph itself on graph inputs: used for the first call's
  inputs when no calibration data is given (they fit the graph by construction);
- `observe_model(module, batches, watched)` runs the user's module eagerly on calibration batches
  (dicts of keyword arguments or tuples of positional ones) and watches `F.linear` calls by their
  weight: batches of any length calibrate, and one run covers every graph of the model.

`calibrate_graph` is what the backend calls: it picks the way, keeps the statistics in a
`CalibrationCache` and puts them on the linears (`ir.CALIB`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.core import ir, qlinear
from qcompile.core.config import Q4Options
from qcompile.core.memo import Memo
from qcompile.core.memory import GrowthTrim, TensorFile
from qcompile.frontend.capture import Frame, calling_modules


class CalibrationError(ValueError):
    """Calibration data is unusable: empty, non-finite, or not fitting the model's signature."""


def observed_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The linear nodes whose weight is a frozen constant: the ones quantization can touch; and
    the grouped expert GEMMs reading a constant 3-D weight (`qlinear.constant_expert_weight`),
    whose stats pool every expert's rows (one activation step for the op)."""
    return [n for n in gm.graph.nodes
            if qlinear.weight_shape(gm, n) is not None or qlinear.constant_expert_weight(gm, n) is not None]


def weight_node(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """The constant weight node of an observed linear or grouped expert GEMM."""
    expert = qlinear.constant_expert_weight(gm, n)
    return n.args[1] if expert is None else expert[0]


def _in_features(gm: fx.GraphModule, n: fx.Node) -> int:
    expert = qlinear.constant_expert_weight(gm, n)
    return qlinear.weight_shape(gm, n)[1] if expert is None else expert[1].shape[-1]


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
    stats = {n: ChannelStats.empty(_in_features(gm, n), gram) for n in observed_linears(gm)}
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


# transformers' opaque grouped GEMM (fp32/fp16 under compile), as a torch function sees it
_TRANSFORMERS_GROUPED_MM = ("transformers.grouped_mm_fallback", "transformers.grouped_mm_fallback.default")


class _LinearInputObserver(TorchFunctionMode):
    """Feeds the input of every `F.linear` (or GPT-2 Conv1D's `torch.addmm(bias, x, weight)`)
    whose weight is watched into that weight's stats, made at its first input."""

    def __init__(self, watched: dict[int, str], stats: dict[str, ChannelStats], gram: bool, share: bool = True):
        super().__init__()
        self.watched = watched  # id(weight parameter) -> its name
        self.stats = stats
        self.gram = gram
        # Linears that read the very tensor the watched linear before them read (q/k/v, gate/up)
        # share its stats, updated once: one Gram matrix per activation, not per linear. Exact
        # only while every call of a follower reads the input of one update of its owner, each
        # update once: checked at each call and by `check_shares` at the end.
        self.share = share
        self.shares: dict[str, str] = {}  # follower name -> owner name (whose stats it shares)
        self.calls: dict[str, int] = {}  # an owner's updates, a follower's calls
        self.followed: dict[str, int] = {}  # follower name -> the number of the update it read last
        self.last: tuple[torch.Tensor, str, int] | None = None  # (input, owner, number) of the last update
        self.updates = 0
        # Freed memory given back as statistics grow: each update frees the batch's temporaries
        # amid the Gram matrices and samples calibration allocates and keeps, and glibc kept them;
        # SmolLM2, 8 x 512 tokens, 1 thread: calibration's peak 1103-1400 MiB above the imports
        # from run to run, 1104-1112 with this (/tmp scratch calib_bench.py)
        self.trim = GrowthTrim()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = weight = None
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
        elif func is torch.addmm and len(args) == 3:
            x, weight = args[1], args[2]
        elif func is torch._grouped_mm or str(func) in _TRANSFORMERS_GROUPED_MM:
            # a mixture of experts' grouped GEMM: x [S, K] (every expert's rows), the 3-D expert
            # weight read through a transpose (a view: its _base is the parameter) or as it is
            x, weight = args[0], args[1]
            if id(weight) not in self.watched and weight._base is not None:
                weight = weight._base
        name = self.watched.get(id(weight)) if weight is not None else None
        if name is not None:
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite activation reaches the linear of {name!r}")
            last_x, last_name, update = self.last or (None, None, 0)
            if name not in self.stats:
                if self.share and x is last_x and self.calls[last_name] == 1:  # its stats hold x alone
                    self.shares[name] = last_name
                    self.stats[name] = self.stats[last_name]
                else:
                    self.stats[name] = ChannelStats.empty(x.shape[-1], self.gram, x.device)
            owner = self.shares.get(name)
            if owner is None:
                self.stats[name].update(x)
                self.trim()
                self.updates += 1
                self.last = (x, name, self.updates)
            elif x is not last_x or last_name != owner or update <= self.followed.get(name, 0):
                raise _SharedInputDiverged(f"the linear of {name!r} shares the stats of {owner!r} (the same "
                                           "input on its first call) but read another input")
            else:
                self.followed[name] = update
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **kwargs)

    def check_shares(self) -> None:
        """After the last batch: each follower read as many inputs as its owner was updated with."""
        for name, owner in self.shares.items():
            if self.calls[name] != self.calls[owner]:
                raise _SharedInputDiverged(f"the linear of {name!r} shares the stats of {owner!r} but was called "
                                           f"{self.calls[name]} times, {owner!r} {self.calls[owner]} times")


class _SharedInputDiverged(CalibrationError):
    """Two linears that shared their stats (one input on the first batch) read different inputs
    later: calibration runs again with stats of their own (`observe_model(share=False)`)."""


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
    share: bool = True,
) -> dict[str, ChannelStats]:
    """Run the user's module eagerly on each batch; return {weight name: stats of its input}
    (linears reading one input share one stats object unless `share` is false).

    Running the module itself (not the captured graph) lets batches of any shape calibrate a
    graph specialized to another, and covers every graph of a model with graph breaks.
    `watched` maps weight parameters to their names; the module is only read, never written.
    """
    stats: dict[str, ChannelStats] = {}
    observer = _LinearInputObserver({id(w): name for w, name in watched.items()}, stats, gram, share)
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
                # force_eager: a compiled forward (model.forward = torch.compile(...)) runs as
                # the user's own code, not back into this compile
                with observer, torch.compiler.set_stance("force_eager"):
                    module(*args, **kwargs)
            except _SharedInputDiverged:
                raise
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
    observer.check_shares()
    return stats


# --- the backend's calibration: cached per weight parameter ---------------------------------------


class CalibrationCache:
    """What a recompile of the same model reuses: calibration statistics by weight parameter,
    then by calibration data and whether they hold Gram matrices, and the results of the
    pipeline's expensive steps (`memo_for`). A generating model compiles several graphs (the
    prompt, the first decode step, the decode steps after it): each finds the statistics and the
    GPTQ / search results of the first, and neither calibrates nor searches again.

    Weights are held weakly: the statistics die with the user's model. An entry holds the
    calibration object itself: while it does, no other object can reuse its id, so a new
    calibration list never gets a dead one's statistics. Each weight keeps the entries of its
    MAX_CALIBRATIONS most recently used calibrations: a process that compiles one model with
    calibration after calibration (an evaluation over recipes and data, a test session) holds
    two sets of statistics and Gram matrices, not one per calibration it ever used (SmolLM2's
    are about 0.5 GB a set with Gram matrices).
    """

    MAX_CALIBRATIONS = 2

    def __init__(self) -> None:
        # {weight: {calibration key: (calibration object, {gram: ChannelStats})}}, least recent first
        self._by_weight: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._memos: WeakIdKeyDictionary = WeakIdKeyDictionary()  # {weight: {calibration key: (calibration, Memo)}}

    def memo_for(self, weights: Sequence[torch.Tensor], calibration: Any) -> Memo:
        """The memo shared by the graphs reading any of `weights` and calibrated on `calibration`
        (a new one if none is). Its keys name each step, linear and arguments, not the
        statistics, so it is shared only by graphs with the same calibration."""
        found = (self._recent(self._memos, w, calibration) for w in weights)
        memo = next((m for m in found if m is not None), None)
        if memo is None:
            memo = Memo()
        for w in weights:
            self._remember(self._memos, w, calibration, memo)
        return memo

    def get(self, weight: torch.Tensor, calibration: Any, gram: bool) -> ChannelStats | None:
        by_gram = self._recent(self._by_weight, weight, calibration)
        return None if by_gram is None else by_gram.get(gram)

    def put(self, weight: torch.Tensor, calibration: Any, gram: bool, stats: ChannelStats) -> None:
        stats.pack_gram()  # (calibration packs its own) half the bytes, for as long as the cache holds it
        by_gram = self._recent(self._by_weight, weight, calibration) or {}
        by_gram[gram] = stats
        self._remember(self._by_weight, weight, calibration, by_gram)

    @staticmethod
    def _key(calibration: Any) -> int | str:
        return "first-call" if calibration is None else id(calibration)

    def _recent(self, table: WeakIdKeyDictionary, weight: torch.Tensor, calibration: Any) -> Any:
        """The value kept for (weight, calibration), now the most recently used; None if none."""
        entries = table.get(weight, {})
        entry = entries.pop(self._key(calibration), None)
        if entry is None or entry[0] is not calibration:
            return None
        entries[self._key(calibration)] = entry  # to the end: the most recent
        return entry[1]

    def _remember(self, table: WeakIdKeyDictionary, weight: torch.Tensor, calibration: Any, value: Any) -> None:
        entries = table.setdefault(weight, {})
        entries.pop(self._key(calibration), None)
        entries[self._key(calibration)] = (calibration, value)
        while len(entries) > self.MAX_CALIBRATIONS:
            del entries[next(iter(entries))]  # the least recently used


def calibrate_graph(aten_gm: fx.GraphModule, example_inputs: list[Any], state: dict[int, tuple],
                    opts: Q4Options, frame: Frame, cache: CalibrationCache, gram: bool) -> None:
    """Attach calibration stats (from `cache`, or observed and cached) to every observed linear
    of the frozen graph; with Gram matrices if `gram`. `state`: the frozen inputs
    {input index: (the user's tensor, fqn)}."""
    linears = observed_linears(aten_gm)
    # The cache is keyed by the user's parameter object, which the frozen constant aliases.
    params = {fqn: tensor for tensor, fqn in state.values()}

    def owner(n: fx.Node) -> torch.Tensor:
        w = weight_node(aten_gm, n)
        return params.get(w.meta.get(ir.FQN), ir.get_constant(aten_gm, w))

    if any(cache.get(owner(n), opts.calibration, gram) is None for n in linears):
        user_inputs = [v for i, v in enumerate(example_inputs) if i not in state]
        file = TensorFile()  # the Gram matrices, out of memory until a pass reads one
        for weight, s in _observe(aten_gm, linears, owner, user_inputs, opts, frame, gram):
            s.spill_gram(file)
            cache.put(weight, opts.calibration, gram, s)
    for n in linears:
        if (s := cache.get(owner(n), opts.calibration, gram)) is not None:
            n.meta[ir.CALIB] = s


def _observe(aten_gm: fx.GraphModule, linears: list[fx.Node], owner: Callable[[fx.Node], torch.Tensor],
             user_inputs: list[Any], opts: Q4Options, frame: Frame,
             gram: bool) -> list[tuple[torch.Tensor, ChannelStats]]:
    """Run the calibration: the user's module on the batches (statistics of every weight of the
    model it reaches), or the graph on the first call's inputs (of this graph's linears).
    `owner` maps a linear to the user's weight, which the statistics are returned by."""
    total = len(opts.calibration) if hasattr(opts.calibration, "__len__") else None
    progress = lambda it: tqdm(it, total=total, desc="q4 calibration", unit="batch",  # noqa: E731
                               disable=not opts.progress, leave=False)
    if opts.calibration is None:
        warnings.warn(
            "qcompile: no calibration data given (options={'calibration': batches}); "
            "calibrating static activation scales on the first call's inputs",
            stacklevel=2,
        )
        return [(owner(n), s) for n, s in observe(aten_gm, [user_inputs], progress, gram).items()]

    module = _model_of(opts.calibration, frame)
    # Watch every weight of the model, not only this graph's: one run calibrates the graphs that
    # follow a graph break too, which then find their statistics in the cache.
    watched = {p: name for name, p in module.named_parameters(remove_duplicate=False) if p.dim() in (2, 3)}
    watched.update({owner(n): weight_node(aten_gm, n).meta.get(ir.FQN, n.name) for n in linears})
    try:
        try:
            by_name = observe_model(module, opts.calibration, watched, progress, gram)
        except _SharedInputDiverged:
            if not isinstance(opts.calibration, Sequence):
                raise
            # a model whose linears share an input on some calls only: each linear its own stats
            by_name = observe_model(module, opts.calibration, watched, progress, gram, share=False)
    except CalibrationError as e:
        if "empty" in str(e) and iter(opts.calibration) is opts.calibration:
            raise CalibrationError(
                f"{e} (the calibration object is an iterator that was already consumed: "
                "pass a list so recompiles can reuse it)"
            ) from None
        raise
    return [(p, by_name[name]) for p, name in watched.items() if name in by_name]


def _fits(module: torch.nn.Module, batch: Any) -> bool:
    args, kwargs = _split_batch(batch, 0)
    try:
        inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _model_of(calibration: Any, frame: Frame) -> torch.nn.Module:
    """The module calibration batches are run through: the one Dynamo is compiling when its
    forward takes them, else the outermost running module that does (a graph that starts after a
    graph break, or a submodule's forward Dynamo compiles on its own after one)."""
    first = next(iter(calibration), None) if isinstance(calibration, Sequence) else None
    candidates = [] if frame.resumed or frame.module is None else [frame.module]
    candidates += calling_modules()
    if first is not None:
        module = next((m for m in candidates if _fits(m, first)), None)
        if module is not None:
            return module
    if candidates:
        return candidates[0]  # an iterator, or no match: observe_model names the mismatch
    raise CalibrationError(
        "calibration batches need the model's forward: this graph was not captured from an nn.Module's "
        "forward (compile the module itself, or leave out 'calibration' to calibrate on the first call)"
    )
