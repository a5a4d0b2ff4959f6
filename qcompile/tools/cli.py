"""The qcompile command line: `qcompile <command>` (or `python -m qcompile <command>`).

    qcompile quantize --out DIR [...]        quantize a model, save the artifact (`qcompile quantize --help`)
    qcompile explain [...]                   what the pipeline did to each pass and linear (`--help`)
    qcompile passes [--import MODULE|FILE.py ...]   every registered pass: summary, options, statistics
    qcompile recipes                         every recipe and its pipeline string
    qcompile eval [...]                      the accuracy table (`python -m qcompile.tools.accuracy --help`)
    qcompile bench kernels|prefill|decode|artifact|memory [...]   the speed and memory tables (`python -m qcompile.tools.bench --help`)
    qcompile bench-gpu [...]                 one GPU table: GEMMs and a Llama-2-7B model, q4 vs FP16 and torchao (`--help`)
    qcompile generate --prompt TEXT [...]    quantize, generate greedily, print the text and tokens/s (`--help`)
    qcompile zoo-matrix [...]                every recipe on tiny models of twelve architectures, fp32/fp16/bf16 (`--help`)

`passes --import my_package.my_passes` imports modules first, so passes they register (with
`qcompile.core.pass_api.register_pass`) are listed beside qcompile's own.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from tabulate import tabulate

import qcompile.passes  # noqa: F401  (declares the built-in passes `qcompile passes` lists)
from qcompile.core.pass_api import registry
from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES


def list_passes(modules: list[str]) -> str:
    for module in modules:
        if module.endswith(".py"):  # a file: import it under its stem
            path = Path(module)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or not path.is_file():
                raise ImportError(f"no Python file {module!r}")
            loaded = sys.modules[path.stem] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded)
        else:
            importlib.import_module(module)
    blocks = []
    for name, cls in sorted(registry().items()):
        lines = [f"{name}  ({cls.__module__})", f"  {cls.summary}"]
        options = cls.describe_options()
        if options:
            table = tabulate(options, headers=["option", "type", "default", "meaning"], tablefmt="plain")
            lines += ["  " + line for line in table.splitlines()]
        if cls.statistics:
            lines.append("  statistics: " + ", ".join(cls.statistics))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def list_recipes() -> str:
    return tabulate([[name + (" (default)" if name == DEFAULT_RECIPE else ""), pipeline]
                     for name, pipeline in RECIPES.items()], headers=["recipe", "pipeline"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    passes = sub.add_parser("passes", help="list the registered passes with their options and statistics")
    passes.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                        help="import this module or .py file first (it may register passes of its own); repeatable")
    sub.add_parser("recipes", help="list the recipes and their pipelines")
    # these hand the rest of the line to their own parsers (and their own --help)
    delegated = {
        "quantize": ("qcompile.tools.quantize", "quantize a model and save the artifact qcompile.load runs (qcompile quantize --help)"),
        "explain": ("qcompile.tools.explain", "per pass and per linear: what the pipeline did, SQNR (qcompile explain --help)"),
        "eval": ("qcompile.tools.accuracy", "the accuracy table (qcompile eval --help)"),
        "bench": ("qcompile.tools.bench", "the speed and memory tables: bench kernels|prefill|decode|artifact|memory "
                                          "(qcompile bench --help)"),
        "bench-gpu": ("qcompile.tools.bench_gpu", "one GPU table: GEMMs and a Llama-2-7B model end to end, q4 against "
                                                  "FP16 and torchao, with a roofline (qcompile bench-gpu --help)"),
        "generate": ("qcompile.tools.generate", "quantize a model, generate from a prompt, print text and tokens/s "
                                                "(qcompile generate --help)"),
        "zoo-matrix": ("qcompile.tools.zoo_matrix", "every recipe on tiny models of twelve architectures in fp32/fp16/bf16 "
                                                    "(qcompile zoo-matrix --help)"),
    }
    for command, (_, text) in delegated.items():
        sub.add_parser(command, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command in delegated:
        module = importlib.import_module(delegated[args.command][0])
        status = module.main(rest)
        if isinstance(status, int) and status:
            sys.exit(status)  # zoo-matrix: a failing cell
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "passes":
        try:
            print(list_passes(args.modules))
        except ImportError as e:
            parser.error(f"--import: {e}")
    else:
        print(list_recipes())

