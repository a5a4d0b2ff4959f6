"""Compile options: `torch.compile(..., options={...})` and `Q4_*` environment variables.

This is the ONLY module of qcompile that reads the environment for compile options (the
kernels read one build switch of their own, `PROCESS_VARIABLES`). Passes take typed options from
the pipeline string and the pass manager takes its instruments from a `Q4Options`, so nothing
downstream depends on process globals.

Every field of `Q4Options` can be set in the options dict under its own name (`print_after_all`)
and, except `calibration` (an object, not text) and `trust_compiled` (a decision about code to
run, made in code), by the variable `Q4_` + the name in upper case (`Q4_PRINT_AFTER_ALL`). The
environment OUTRANKS the options dict: the person running the program (who may want a dump or a
different pipeline without editing code) gets the last word over the code that calls
torch.compile. Both sources are checked the same way: an unknown option key is an
error listing the valid keys; an unknown `Q4_*` variable is a warning listing the valid names
(it may belong to someone else, but it is most likely a typo).

Environment text is converted by the field's type: booleans accept 1/0, true/false, yes/no,
on/off; tuples are comma-separated lists (`Q4_PRINT_AFTER=insert-quantizers,fuse-kernels`);
strings are taken as they are (`Q4_PIPELINE=` is the empty pipeline).
"""

from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from qcompile.core.pass_api import named, parse_value
from qcompile.core.recipes import DEFAULT_RECIPE

__all__ = ["Q4Options", "resolve_options", "ENV_PREFIX", "env_names"]

ENV_PREFIX = "Q4_"
# Read below this module, once per process, by the kernels it switches (not a compile option):
# Q4_CPU_KERNELS=off|scalar (qcompile/kernels/cpu_kernels.py: skip the C++ decode kernels, or force their portable loop)
PROCESS_VARIABLES = ("Q4_CPU_KERNELS",)


def _field(default: Any, *, choices: tuple | None = None, env: bool = True) -> Any:
    return dataclasses.field(default=default, metadata={"choices": choices, "env": env})


@dataclasses.dataclass(frozen=True)
class Q4Options:
    """Everything that configures one q4 compilation (see the module docstring for sources)."""

    # which passes run: a recipe names a pipeline; `pipeline` replaces it with any pipeline text
    recipe: str = DEFAULT_RECIPE  # "w4a4"
    calibration: object = _field(None, env=False)  # an iterable of batches
    pipeline: str | None = None  # None: the recipe's pipeline
    # instrumentation, owned by the pass manager
    print_before: tuple[str, ...] = ()
    print_after: tuple[str, ...] = ()
    print_after_all: bool = False
    print_after_change: bool = False
    print_after_failure: bool = False
    print_provenance: bool = False  # printed and dumped graphs say which pass made each node
    dump_dir: str | None = None
    verify_each: bool = True
    timing: bool = False
    stats: bool = False
    memory: bool = False  # resident memory after each stage and pass (instrument.Memory)
    disable: tuple[str, ...] = ()  # passes dropped from the pipeline (Pipeline.without)
    # False: insert-quantizers{rounding=false}: nothing is rounded, so the compiled graph is the
    # migrated, rotated, folded float graph and must compute the model's own function (exactness)
    rounding: bool = True
    # linears whose structure migrate-scales cannot match: "quantize" (without migration) or "float"
    unmatched: str = _field("quantize", choices=("quantize", "float"))
    # lowering of the final graph
    lower: str = _field("inductor", choices=("inductor", "eager"))
    # the integer GEMMs: "auto" runs the CPU integer kernels on CPU and the Triton kernels on
    # CUDA; "triton" runs the Triton kernels everywhere (on CPU in Triton's interpreter: slow,
    # exact, for debugging the kernels with a model's real operands)
    kernels: str = _field("auto", choices=("auto", "triton"))
    # Inductor's mode for the lowering ("max-autotune": tuned kernels and CUDA graphs on a GPU):
    # torch.compile takes `mode` or `options`, not both, and q4 needs its options
    mode: str = _field("default", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    progress: bool = True  # tqdm progress bars
    # warn once when a call's activations go far beyond the calibrated range (qcompile/backends/range_check.py)
    range_warning: bool = True
    # a directory saved by qcompile.quantize(...).save(dir): its statistics replace calibration
    # and its pipeline replays with the saved results of its expensive steps (qcompile/frontend/saved_artifact.py)
    artifact: str | None = None
    # load the artifact's compiled kernels (`compiled.bin`: pickled Inductor cache entries and
    # generated code, which run when loaded) instead of compiling them here. Only for artifacts
    # from a source trusted like code: whoever wrote the directory wrote its hash too. An option
    # given in code, never read from the environment.
    trust_compiled: bool = _field(False, env=False)


_FIELDS = {f.name: f for f in dataclasses.fields(Q4Options)}
_TYPES = typing.get_type_hints(Q4Options)
_STRINGS = tuple[str, ...]


def env_names() -> dict[str, str]:
    """{environment variable: field name} for every field that can be set from the environment."""
    return {ENV_PREFIX + name.upper(): name for name, f in _FIELDS.items() if f.metadata.get("env", True)}


def _from_text(name: str, text: str, where: str) -> Any:
    """Convert environment text to the type of field `name`."""
    typ = _TYPES[name]
    if typ is bool:
        return parse_value(text, bool, where)
    if typ == _STRINGS:
        return _split(text)
    return text


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _check(name: str, value: Any, where: str) -> Any:
    """`value` for field `name` after checking its type and choices; strings become tuples."""
    typ = _TYPES[name]
    if typ == _STRINGS:
        if isinstance(value, str):  # "a,b" is as good as ("a", "b")
            value = _split(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{where}: expected pass names (a list of strings or 'a,b'), got {value!r}")
        return tuple(value)
    allowed = typing.get_args(typ) or (typ,)  # `str | None` -> (str, NoneType)
    if typ is not object and not isinstance(value, allowed):
        expected = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise TypeError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    choices = _FIELDS[name].metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: {value!r} is not one of: {', '.join(choices)}")
    return value


def _named(words: list[str], valid: Iterable[str]) -> str:
    """'a' (did you mean 'b'?), 'c' -- for error messages about unknown names."""
    return ", ".join(named(word, valid) for word in words)


def resolve_options(options: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ) -> Q4Options:
    """The `Q4Options` from an options dict and the environment (read once, here; it wins).

    `environ` is a parameter so that tests and tools can pass their own (`environ={}` ignores
    the process environment).
    """
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"q4 options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    unknown = [key for key in options if key not in _FIELDS]
    if unknown:
        raise ValueError(f"unknown q4 option {_named(unknown, _FIELDS)}; valid options: {', '.join(_FIELDS)}")
    values = {name: _check(name, value, f"option {name!r}") for name, value in options.items()}

    env = {key: text for key, text in environ.items() if key.startswith(ENV_PREFIX)}  # one snapshot
    names = env_names()
    strays = sorted(key for key in env if key not in names and key not in PROCESS_VARIABLES)
    if strays:
        warnings.warn(
            f"ignoring unknown environment variable {_named(strays, names)}; "
            f"qcompile reads: {', '.join(names)}",
            stacklevel=2,
        )
    for key, text in env.items():
        if key in names:
            name = names[key]
            where = f"environment variable {key}"
            values[name] = _check(name, _from_text(name, text, where), where)
    return Q4Options(**values)
