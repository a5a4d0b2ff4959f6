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
names written in kebab-case (`w_bits` <-> `w-bits`). The registry holds what has been registered:
`import qcompile.passes` declares qcompile's own passes (the front half, the backend and the CLI
import it; core never does).

A pass also declares its contracts, which the rest of the infrastructure checks:

    after = {"insert-quantizers": "why"}   passes that, when in the same pipeline, must run before
    before = {"fuse-kernels": "why"}       ... and after it; `parse_pipeline` rejects a pipeline
                                           that breaks one, naming both passes and the reason
    invariants = (check, ...)              `check(gm, node) -> str | None`: what holds from this
                                           pass on; the verifier checks them on every graph this
                                           pass has run on (`passes_run(gm)`)

A pass is a pure graph transformation: it never reads the environment, never prints, never
touches the user's module. The pass manager owns printing, dumping, verification, timing and
statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from qcompile.core import analysis, ir
from qcompile.core.memory import GrowthTrim

T = TypeVar("T")

__all__ = [
    "PassResult",
    "QPass",
    "NoOptions",
    "option",
    "register_pass",
    "registry",
    "get_pass_class",
    "PipelineError",
    "Invariant",
    "passes_run",
    "markdown_table",
    "in_pipeline_order",
]

# A postcondition: what is wrong at `node` of `gm`, or None.
Invariant = Callable[[GraphModule, Node], "str | None"]


def passes_run(gm: GraphModule) -> list[str]:
    """The names of the passes that have run on `gm` (recorded by `QPass.__call__`), in order."""
    return list(gm.meta.get(ir.PASSES_RUN, ()))

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


def parse_value(text: str, typ: type, where: str) -> Any:
    """`text` (from a pipeline string or a `Q4_*` variable) as a value of `typ`; errors name `where`."""
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
    # ordering constraints: {other pass: why}; checked when a pipeline is parsed
    after: ClassVar[Mapping[str, str]] = {}
    before: ClassVar[Mapping[str, str]] = {}
    # postconditions this pass establishes, checked by the verifier from then on
    invariants: ClassVar[tuple[Invariant, ...]] = ()

    def __init__(self, options: Any | None = None):
        self.options = options if options is not None else self.Options()
        self.stats: Counter[str] = Counter({s: 0 for s in self.statistics})
        # The node `nodes()` last handed out: the pass manager names it when the pass fails.
        self.current_node: Node | None = None
        self.show_progress = False  # the pass manager turns it on (`progress`)
        self.trim_memory = GrowthTrim()  # `progress` calls it between items; a large item may mid-way

    def __call__(self, graph_module: GraphModule) -> PassResult | None:
        """Run the pass (`requires` -> `call` -> `ensures`); then record on the graph that it ran
        (the verifier checks this pass's invariants from now on) and, when it changed the graph,
        drop the analyses cached for it: done here, so a pass run without a manager is safe too."""
        result = super().__call__(graph_module)
        if isinstance(result, PassResult):
            gm = result.graph_module
            gm.meta[ir.PASSES_RUN] = [*passes_run(gm), self.name]
            if result.modified or gm is not graph_module:
                analysis.invalidate(gm)
                analysis.invalidate(graph_module)
        return result

    def progress(self, items: Iterable[T], unit: str) -> Iterator[T]:
        """`items`, under a progress bar when the pass manager shows progress (`show_progress`,
        from the `progress` option). The bar appears only after two seconds: quick passes print
        nothing, long ones (GPTQ, searches, learning) say how far they are. Between items, memory
        the pass freed goes back to the system when it has piled up (`memory.GrowthTrim`)."""
        if self.show_progress:
            items = tqdm(items, desc=f"q4 {self.name}", unit=unit, leave=False, delay=2.0)
        self.trim_memory = GrowthTrim()
        for item in items:
            yield item
            self.trim_memory()

    def nodes(self, graph_module: GraphModule) -> Iterator[Node]:
        """Iterate a snapshot of the graph's nodes (safe to edit the graph meanwhile), keeping
        the node at hand in `current_node` so that a failure can name it."""
        for node in self.progress(list(graph_module.graph.nodes), "node"):
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
                    f"pass {cls.name!r} has no option {named(key, fields)}; valid options: {valid}"
                )
            field = fields[key]
            where = f"option {key!r} of pass {cls.name!r}"
            value = parse_value(text, _field_type(cls.Options, field), where)
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
    for kind in ("after", "before"):
        constraints = getattr(cls, kind)
        if not isinstance(constraints, Mapping) or not all(KEBAB.match(k) and v for k, v in constraints.items()):
            raise TypeError(f"pass {name!r}: {kind} must map pass names to the reason, got {constraints!r}")
    if not all(callable(check) for check in cls.invariants):
        raise TypeError(f"pass {name!r}: invariants must be functions check(gm, node) -> str | None")
    previous = _REGISTRY.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise TypeError(
            f"pass name {name!r} is taken by {previous.__module__}.{previous.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[QPass]]:
    """Every registered pass, by name (qcompile's own once `qcompile.passes` is imported, plus any
    registered by user code)."""
    return dict(_REGISTRY)


@contextlib.contextmanager
def registry_restored() -> Iterator[None]:
    """The registry as it was before the block, restored after it: passes registered inside the
    block (a test's toy pass, a user's pass file tried in a notebook) are gone afterwards."""
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def named(word: str, valid: Iterable[str]) -> str:
    """`'word'`, with ` (did you mean 'close'?)` when a valid name is close: for errors about unknown names."""
    close = difflib.get_close_matches(word, list(valid), n=1)
    return repr(word) + (f" (did you mean {close[0]!r}?)" if close else "")


def get_pass_class(name: str) -> type[QPass]:
    passes = registry()
    if name not in passes:
        valid = ", ".join(sorted(passes))
        raise PipelineError(f"unknown pass {named(name, passes)}; registered passes: {valid}")
    return passes[name]


# --- the table of qcompile/passes/README.md -------------------------------------------------------------------


def in_pipeline_order(passes: Mapping[str, type[QPass]]) -> list[str]:
    """The names of `passes` in an order that keeps every declared ordering constraint among them
    (a topological order; ties by name)."""
    preds: dict[str, set[str]] = {name: set() for name in passes}
    for name, cls in passes.items():
        preds[name] |= {other for other in cls.after if other in passes}
        for other in cls.before:
            if other in passes:
                preds[other].add(name)
    order: list[str] = []
    while preds:
        ready = sorted(name for name, before in preds.items() if not before)
        if not ready:
            raise PipelineError(f"the ordering constraints of {', '.join(sorted(preds))} form a cycle")
        order.append(ready[0])
        del preds[ready[0]]
        for before in preds.values():
            before.discard(ready[0])
    return order


def markdown_table(passes: Mapping[str, type[QPass]]) -> str:
    """The Markdown table of `passes`: name with default options, summary, statistics, ordering
    (declared by either pass) and declared invariants, one row per pass in pipeline order.
    `qcompile/passes/README.md` holds it for qcompile's own passes."""
    rows = ["| pass | summary | statistics | runs after | runs before | invariants |", "|---|---|---|---|---|---|"]
    order = in_pipeline_order(passes)
    after = {name: {*cls.after} | {o for o, c in passes.items() if name in c.before} for name, cls in passes.items()}
    before = {name: {*cls.before} | {o for o, c in passes.items() if name in c.after} for name, cls in passes.items()}

    def names(items) -> str:
        return ", ".join(f"`{item}`" for item in sorted(items, key=order.index) if item in passes) or "-"

    for name in order:
        cls = passes[name]
        defaults = ",".join(f"{key}={default}" for key, _, default, _ in cls.describe_options())
        spec = f"{name}{{{defaults}}}" if defaults else name
        summary = cls.summary.strip().replace("|", "\\|")
        stats = ", ".join(f"`{stat}`" for stat in cls.statistics) or "-"
        checks = ", ".join(f"`{check.__name__.replace('_', '-')}`" for check in cls.invariants) or "-"
        rows.append(f"| `{spec}` | {summary} | {stats} | {names(after[name])} | {names(before[name])} | {checks} |")
    return "\n".join(rows) + "\n"
