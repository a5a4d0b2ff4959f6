"""Declaring a pass: name, summary, typed options, named statistics.

A pass is a class that subclasses :class:`QPass` and is decorated with :func:`register_pass`::

    @dataclass
    class MyOptions:
        threshold: float = 0.5                       # pipeline key: threshold
        mode: str = option("fast", choices=("fast", "exact"))

    @register_pass
    class MyPass(QPass):
        name = "my-pass"
        summary = "One line that says what the pass does."
        Options = MyOptions
        statistics = ("nodes-rewritten",)

        def call(self, gm):
            ...
            self.count("nodes-rewritten")
            return PassResult(gm, modified)

The registry is built from these declarations (never from a list kept by hand); the pipeline
string `my-pass{threshold=0.7,mode=exact}` names the pass and its options, with dataclass field
names written in kebab-case (`w_bits` <-> `w-bits`).

A pass is a pure graph transformation: it never reads the environment, never prints, never
touches the user's module. The pass manager owns printing, dumping, verification, timing and
statistics.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections import Counter
from typing import Any, ClassVar, Iterator

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = [
    "PassResult",
    "QPass",
    "NoOptions",
    "option",
    "register_pass",
    "registry",
    "get_pass_class",
    "PipelineError",
]

KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class PipelineError(ValueError):
    """A pipeline string, pass name, option key or option value is not valid."""


def option(default: Any, *, choices: tuple | None = None, help: str = "") -> Any:
    """A dataclass field for pass options, with optional allowed values and a help line."""
    return dataclasses.field(default=default, metadata={"choices": choices, "help": help})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


def to_kebab(field_name: str) -> str:
    return field_name.replace("_", "-")


def _field_type(options_cls: type, field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(options_cls)
    return hints[field.name]


def _parse_value(text: str, typ: type, where: str) -> Any:
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise PipelineError(f"{where}: expected a boolean (true/false), got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise PipelineError(f"{where}: expected an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise PipelineError(f"{where}: expected a number, got {text!r}") from None
    return text


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class QPass(PassBase):
    """Base class of every qcompile pass. Subclasses declare the class attributes below."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    statistics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any | None = None):
        self.options = options if options is not None else self.Options()
        self.stats: Counter[str] = Counter({s: 0 for s in self.statistics})
        # The node `nodes()` last handed out: the pass manager names it when the pass fails.
        self.current_node: Node | None = None

    def nodes(self, graph_module: GraphModule) -> Iterator[Node]:
        """Iterate a snapshot of the graph's nodes (safe to edit the graph meanwhile), keeping
        the node at hand in `current_node` so that a failure can name it."""
        for node in list(graph_module.graph.nodes):
            self.current_node = node
            yield node
        self.current_node = None

    def count(self, statistic: str, n: int = 1) -> None:
        """Increment a declared statistics counter."""
        if statistic not in self.statistics:
            raise KeyError(f"pass {self.name!r} did not declare statistic {statistic!r}")
        self.stats[statistic] += n

    def call(self, graph_module: GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def calibration_needs(self) -> frozenset[str]:
        """Optional calibration statistics this pass reads, beyond per-channel ranges and
        samples: `"gram"` (each linear input's x^T x). The backend collects them before it
        calibrates, so statistics nobody reads are never accumulated."""
        return frozenset()

    # --- options ------------------------------------------------------------------------------

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Options))

    @classmethod
    def option_keys(cls) -> list[str]:
        return [to_kebab(f.name) for f in cls.option_fields()]

    @classmethod
    def parse_options(cls, raw: dict[str, str]) -> Any:
        """Typed options from `{kebab-key: text}`; errors list the valid keys or values."""
        fields = {to_kebab(f.name): f for f in cls.option_fields()}
        values = {}
        for key, text in raw.items():
            if key not in fields:
                valid = ", ".join(fields) or "(this pass takes no options)"
                raise PipelineError(
                    f"pass {cls.name!r} has no option {key!r}; valid options: {valid}"
                )
            field = fields[key]
            where = f"option {key!r} of pass {cls.name!r}"
            value = _parse_value(text, _field_type(cls.Options, field), where)
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices:
                valid = ", ".join(format_value(c) for c in choices)
                raise PipelineError(f"{where}: {text!r} is not one of: {valid}")
            values[field.name] = value
        return cls.Options(**values)

    @classmethod
    def describe_options(cls) -> list[tuple[str, str, str, str]]:
        """(key, type, default, help) for each option: used by `qcompile passes` and errors."""
        rows = []
        for f in cls.option_fields():
            typ = _field_type(cls.Options, f)
            choices = f.metadata.get("choices")
            kind = "|".join(format_value(c) for c in choices) if choices else typ.__name__
            rows.append((to_kebab(f.name), kind, format_value(f.default), f.metadata.get("help", "")))
        return rows


_REGISTRY: dict[str, type[QPass]] = {}


def register_pass(cls: type[QPass]) -> type[QPass]:
    """Class decorator: check a pass declaration and add it to the registry."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not KEBAB.match(name):
        raise TypeError(f"{cls.__qualname__}: pass name must be kebab-case, got {name!r}")
    summary = getattr(cls, "summary", "")
    if not summary or "\n" in summary.strip():
        raise TypeError(f"pass {name!r}: summary must be one non-empty line")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"pass {name!r}: Options must be a dataclass")
    for stat in cls.statistics:
        if not KEBAB.match(stat):
            raise TypeError(f"pass {name!r}: statistic {stat!r} must be kebab-case")
    previous = _REGISTRY.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise TypeError(
            f"pass name {name!r} is taken by {previous.__module__}.{previous.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[QPass]]:
    """All declared passes, by name: qcompile's own plus any registered by user code."""
    import qcompile.passes  # noqa: F401  (importing the package declares the built-in passes)

    return dict(_REGISTRY)


def get_pass_class(name: str) -> type[QPass]:
    passes = registry()
    if name not in passes:
        valid = ", ".join(sorted(passes))
        raise PipelineError(f"unknown pass {name!r}; registered passes: {valid}")
    return passes[name]
