"""Textual pass pipelines: parse, validate, print back, instantiate.

A pipeline is one line naming passes in order, each with optional options in braces::

    insert-quantizers{w-bits=4,a-bits=4},fuse-kernels

It is the unit of reproduction (MLIR habit): whatever ran can be re-run by pasting that line into
`Q4_PIPELINE`, so `str(parse_pipeline(text)) == text` for every well-formed `text`. Well-formed
means canonical: no whitespace and no empty braces. The parser tolerates whitespace around
names, keys, values and separators, and `name{}`, but prints the canonical form.

Grammar (values may be empty, e.g. `skip=`, and may contain `=`)::

    pipeline := ""  |  spec ("," spec)*
    spec     := name ("{" [option ("," option)*] "}")?
    option   := key "=" value
    name, key:  one or more characters other than  , { } =  and whitespace
    value:      zero or more characters other than  , { }  and whitespace

Parsing also validates against the pass registry (`qcompile.core.pass_api.registry()`): an unknown
pass lists the registered ones, an unknown option key or a bad value gives the error of
`QPass.parse_options` (which lists the valid keys or values), and a pass placed against an ordering
constraint a pass declares (`QPass.after` / `QPass.before`) names both passes and the reason:

    fuse-kernels,insert-quantizers
    -> 'fuse-kernels' must run after 'insert-quantizers' (fuse-kernels declares after=insert-quantizers:
       it fuses the fake-quantized linears insert-quantizers leaves; ...)

Every error shows the text with a caret under the position at fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from qcompile.core.config import Q4Options
from qcompile.core.pass_api import PipelineError, QPass, format_value, get_pass_class, registry, to_kebab
from qcompile.core.recipes import recipe_pipeline

__all__ = ["PassSpec", "Pipeline", "parse_pipeline", "pipeline_for"]


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline: its name and its options as written (`{kebab-key: text}`, in order)."""

    name: str
    raw_options: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}{{{self.options_text()}}}" if self.raw_options else self.name

    def options_text(self) -> str:
        """The options between the braces: `w-bits=4,a-bits=4` ('' when there are none)."""
        return ",".join(f"{key}={value}" for key, value in self.raw_options.items())

    @property
    def pass_class(self) -> type[QPass]:
        return get_pass_class(self.name)

    @cached_property
    def options(self) -> Any:
        """The typed options, parsed once (`PipelineError` if a key or value is not valid)."""
        return self.pass_class.parse_options(self.raw_options)

    def instantiate(self) -> QPass:
        """A fresh pass object (fresh statistics) with these options."""
        return self.pass_class(self.options)

    @classmethod
    def of(cls, qpass: QPass) -> PassSpec:
        """The spec of a pass object with ALL its effective options, defaults included."""
        options = {
            to_kebab(f.name): format_value(getattr(qpass.options, f.name)) for f in qpass.option_fields()
        }
        return cls(qpass.name, options)


class Pipeline(list):
    """A list of `PassSpec`; `str()` gives the pipeline text back."""

    def __str__(self) -> str:
        return ",".join(str(spec) for spec in self)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def names(self) -> list[str]:
        return [spec.name for spec in self]

    def without(self, names: Iterable[str]) -> Pipeline:
        """This pipeline minus every pass named in `names` (for `Q4_DISABLE`).

        A name that is no registered pass is an error listing the registered ones: a typo in a
        disable list must not silently leave the pass running. A registered pass this pipeline
        does not hold is nothing to drop: `Q4_DISABLE` applies to every graph and recipe of the
        process, and `Q4_DISABLE=migrate-scales` must not break a recipe without migration.
        """
        names = (names,) if isinstance(names, str) else tuple(names)
        known = registry()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PipelineError(
                f"cannot disable {', '.join(map(repr, unknown))}: no such pass; "
                f"registered passes: {', '.join(sorted(known))}"
            )
        return Pipeline(spec for spec in self if spec.name not in names)

    def with_option(self, name: str, key: str, value: str) -> Pipeline:
        """This pipeline with option `key=value` set on every pass named `name` (kebab-case key)."""
        return Pipeline(
            PassSpec(spec.name, {**spec.raw_options, key: value}) if spec.name == name else spec for spec in self
        )

    def instantiate(self) -> list[QPass]:
        """Fresh pass objects in order, each with its typed options."""
        return [spec.instantiate() for spec in self]

    def calibration_needs(self) -> frozenset[str]:
        """The optional calibration statistics its passes read (`QPass.calibration_needs`)."""
        return frozenset().union(*(p.calibration_needs() for p in self.instantiate()))


def parse_pipeline(text: str) -> Pipeline:
    """Parse and validate pipeline `text`; the empty string is the empty pipeline."""
    parser = _Parser(text)
    specs = parser.pipeline()
    for spec, position in specs:
        try:
            _ = spec.pass_class, spec.options  # look up and parse now: a bad value fails here, not mid-run
        except PipelineError as e:
            raise parser.error(str(e), position) from None
    broken = ordering_violation([spec.name for spec, _ in specs])
    if broken is not None:
        index, message = broken
        raise parser.error(message, specs[index][1])
    return Pipeline(spec for spec, _ in specs)


def ordering_violation(names: list[str]) -> tuple[int, str] | None:
    """The first ordering constraint the pass sequence `names` breaks, as (index of the pass placed
    wrongly, message); None when all hold. A constraint binds only passes both in the pipeline,
    and every run of each (insert-quantizers may run twice)."""
    for i, name in enumerate(names):
        cls = get_pass_class(name)
        for other, why in cls.after.items():
            later = [j for j in range(i + 1, len(names)) if names[j] == other]
            if later:
                return later[0], (f"{name!r} must run after {other!r} ({name} declares after={other}: {why}); "
                                  f"here {other!r} comes after it")
        for other, why in cls.before.items():
            earlier = [j for j in range(i) if names[j] == other]
            if earlier:
                return i, (f"{name!r} must run before {other!r} ({name} declares before={other}: {why}); "
                           f"here {other!r} comes before it")
    return None


# Characters that end a name or key; a value may contain "=".
_STOP_WORD = set(",{}=")
_STOP_VALUE = set(",{}")


class _Parser:
    """A hand-written scanner over `text`; `pos` is the index of the next character to read."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, message: str, position: int) -> PipelineError:
        return PipelineError(f"{message}\n  {self.text}\n  {' ' * position}^")

    def peek(self) -> str:
        """The next non-space character ('' at the end)."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos : self.pos + 1]

    def token(self, stop: set[str]) -> str:
        self.peek()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in stop and not self.text[self.pos].isspace():
            self.pos += 1
        return self.text[start : self.pos]

    def pipeline(self) -> list[tuple[PassSpec, int]]:
        """Every spec with the position of its name (for validation errors)."""
        specs = []
        if not self.peek():
            return specs
        while True:
            specs.append(self.spec())
            char = self.peek()
            if not char:
                return specs
            if char == "}":
                raise self.error("unbalanced '}': no '{' is open", self.pos)
            if char != ",":
                raise self.error(f"expected ',' between passes, got {char!r}", self.pos)
            self.pos += 1

    def spec(self) -> tuple[PassSpec, int]:
        self.peek()
        start = self.pos
        name = self.token(_STOP_WORD)
        if not name:
            raise self.error("expected a pass name", self.pos)
        options: dict[str, str] = {}
        if self.peek() == "{":
            self.pos += 1
            if self.peek() == "}":  # `name{}`: no options
                self.pos += 1
                return PassSpec(name, options), start
            while True:
                key_position = self.pos
                key = self.token(_STOP_WORD)
                if not key:
                    raise self.error(f"expected an option key of pass {name!r}", self.pos)
                if self.peek() != "=":
                    raise self.error(f"expected '=' after option key {key!r} of pass {name!r}", self.pos)
                self.pos += 1
                value = self.token(_STOP_VALUE)
                if key in options:
                    raise self.error(f"duplicate option key {key!r} of pass {name!r}", key_position)
                options[key] = value
                char = self.peek()
                if not char:
                    raise self.error(f"expected '}}' to close the options of pass {name!r}", self.pos)
                if char not in ",}":
                    raise self.error(f"expected ',' or '}}' in the options of pass {name!r}, got {char!r}",
                                     self.pos)
                self.pos += 1
                if char == "}":
                    break
        return PassSpec(name, options), start


def pipeline_for(opts: Q4Options) -> Pipeline:
    """The pipeline `opts` asks for: the recipe's (or `opts.pipeline`), minus `opts.disable`, with
    the `rounding` and `unmatched` options applied to insert-quantizers."""
    pipeline = parse_pipeline(opts.pipeline if opts.pipeline is not None else recipe_pipeline(opts.recipe))
    if opts.disable:
        pipeline = pipeline.without(opts.disable)
    if not opts.rounding:
        pipeline = pipeline.with_option("insert-quantizers", "rounding", "false")
    if opts.unmatched != "quantize":
        pipeline = pipeline.with_option("insert-quantizers", "unmatched", opts.unmatched)
    return pipeline
