"""Calibration: run the frozen ATen graph on calibration batches and observe linear inputs.

For every `aten.linear` whose weight is a frozen constant, an observer records per-input-channel
statistics of the activation the linear reads (absmax over all tokens). The statistics are keyed
by the weight's parameter name (`q4_fqn`), so a Dynamo recompile of the same model (a new
sequence length, say) finds them in the cache and does not calibrate again.

Mapping a calibration batch to graph inputs: Dynamo names every graph input by its source in the
compiled frame (`L['args'][0]`, `L['kwargs']['input_ids']`, `L['input_ids'].size()[1]`). A batch
(a dict of keyword arguments or a tuple of positional ones) is bound to the model's forward
signature, and each source is evaluated against that binding.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx

from qcompile import ir


class CalibrationError(ValueError):
    """Calibration data is unusable: empty, non-finite, or not fitting the model's signature."""


@dataclasses.dataclass
class ChannelStats:
    """Statistics of one activation tensor, per channel of its last dimension."""

    absmax: torch.Tensor  # float32 [channels]
    num_tokens: int = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(dim=0))
        self.num_tokens += flat.shape[0]

    @classmethod
    def empty(cls, channels: int) -> "ChannelStats":
        return cls(absmax=torch.zeros(channels, dtype=torch.float32))


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
) -> dict[fx.Node, ChannelStats]:
    """Run `gm` on each batch of graph inputs; return the stats of every observed linear."""
    stats = {n: ChannelStats.empty(ir.get_constant(gm, n.args[1]).shape[1]) for n in observed_linears(gm)}
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


# --- binding calibration batches to graph inputs ---------------------------------------------------

_ROOTS = [
    (re.compile(r"^L\['args'\]\[(\d+)\](.*)$"), "positional"),
    (re.compile(r"^L\['kwargs'\]\['([^']+)'\](.*)$"), "keyword"),
    (re.compile(r"^L\['([^']+)'\](.*)$"), "local"),
]


@dataclasses.dataclass
class InputBinder:
    """Turns a calibration batch into the graph's input list, following Dynamo's input sources.

    `signature` is the model's forward signature (without `self`); `sources` the source
    expression of each graph input, None for inputs that are frozen constants.
    """

    signature: inspect.Signature | None
    sources: list[str | None]
    frame_varargs: str | None  # name of the compiled frame's *args (HF wraps forward in one)

    def _argument(self, source: str, bound: dict[str, Any]) -> tuple[str, str]:
        for pattern, kind in _ROOTS:
            m = pattern.match(source)
            if not m:
                continue
            key, rest = m.group(1), m.group(2)
            if kind == "positional":
                params = list(self.signature.parameters) if self.signature else []
                index = int(key)
                if index >= len(params):
                    raise CalibrationError(f"graph input {source} has no matching forward argument")
                return params[index], rest
            if kind == "local" and key == self.frame_varargs:
                break
            return key, rest
        raise CalibrationError(
            f"cannot bind calibration batches to graph input {source}: it is not an argument of the "
            "model's forward (the graph probably starts after a graph break)"
        )

    def bind(self, batch: Any, index: int) -> list[Any]:
        if isinstance(batch, dict):
            args, kwargs = (), batch
        elif isinstance(batch, (tuple, list)):
            args, kwargs = tuple(batch), {}
        elif isinstance(batch, torch.Tensor):
            args, kwargs = (batch,), {}
        else:
            raise CalibrationError(
                f"calibration batch {index} is a {type(batch).__name__}; expected a dict of keyword "
                "arguments or a tuple of positional arguments of the model"
            )
        if self.signature is not None:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise CalibrationError(
                    f"calibration batch {index} does not fit the model's signature "
                    f"forward{self.signature}: {e}"
                ) from None
            arguments = dict(bound.arguments)
            for name, param in self.signature.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                    arguments.update(arguments.pop(name))
        else:
            arguments = dict(kwargs)
        values, used = [], set()
        for source in self.sources:
            if source is None:
                values.append(None)
                continue
            name, rest = self._argument(source, arguments)
            if name not in arguments:
                raise CalibrationError(
                    f"calibration batch {index} lacks argument {name!r}, which the compiled graph "
                    f"takes (graph input {source}); it has: {', '.join(arguments) or 'nothing'}"
                )
            used.add(name)
            value = arguments[name]
            try:
                value = eval("_v" + rest, {"__builtins__": {}}, {"_v": value}) if rest else value
            except Exception as e:  # noqa: BLE001 - report any failure to evaluate the source
                raise CalibrationError(
                    f"calibration batch {index}: cannot read graph input {source} from argument "
                    f"{name!r}: {e}"
                ) from None
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CalibrationError(
                    f"calibration batch {index}: argument {name!r} holds NaN or inf"
                )
            values.append(value)
        unused = [k for k, v in arguments.items() if k not in used and v is not None]
        if unused:
            raise CalibrationError(
                f"calibration batch {index} passes {', '.join(map(repr, unused))}, which the compiled "
                "graph does not take (the model was first called without it): calibrate with "
                "batches shaped like the calls the model gets"
            )
        return values


def forward_signature(frame_locals: dict[str, Any], code: Any) -> tuple[inspect.Signature | None, str | None]:
    """The signature calibration batches bind to, from the compiled frame.

    For a module's forward the signature is the module's `forward` (following `__wrapped__`
    through decorators such as Hugging Face's); for a plain function, the frame's own arguments.
    Also returns the frame's *args name, which HF's wrapper frame uses to pass positionals.
    """
    varargs = None
    if code is not None and code.co_flags & inspect.CO_VARARGS:
        varargs = code.co_varnames[code.co_argcount + code.co_kwonlyargcount]
    module = frame_locals.get("self")
    if isinstance(module, torch.nn.Module):
        return inspect.signature(module.forward), varargs
    if code is None:
        return None, varargs
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    return inspect.Signature(params), varargs
