"""`qcompile explain`: what q4 does to a shipped model, linear by linear (`qcompile.api.explain`).

    qcompile explain [--model smollm2|minilm|tiny-FAMILY] [--recipe w4a4] [--pipeline TEXT] [--tokens 256] [--json FILE]

`--model tiny-mixtral` (any family of `qcompile.tools.tiny_models`, as `qcompile zoo-matrix`
compiles them) explains the tiny random-weight model of that architecture, calibrated on random
token ids: which of its linears run quantized, and why the others stay in float.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qcompile.api.explain import ExplainReport, explain
from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES
from qcompile.tools import zoo
from qcompile.tools.tiny_models import FAMILIES

TINY = [f"tiny-{name}" for name in FAMILIES]


def main(argv: list[str] | None = None) -> ExplainReport:
    parser = argparse.ArgumentParser(
        prog="qcompile explain",
        description="What q4 does to a shipped model, linear by linear: how each runs (or why it stays in "
                    "float), its input's outlier ratio before and after migration/rotation, and its local "
                    "quantization SQNR on Emma tokens; the passes with times and statistics; the pipeline "
                    "that reproduces it. Nothing is lowered or compiled.")
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "minilm", *TINY), metavar="MODEL",
                        help="shipped model: smollm2 (SmolLM2-135M, default) or minilm (all-MiniLM-L6-v2); or a "
                             f"tiny random-weight model of an architecture: {', '.join(TINY)}")
    parser.add_argument("--recipe", default=None,
                        help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE}, or Q4_RECIPE)")
    parser.add_argument("--pipeline", default=None, help="a pipeline string replacing the recipe's")
    parser.add_argument("--tokens", type=int, default=256,
                        help="calibration tokens of Emma (default 256); the first window is the example input")
    parser.add_argument("--window", type=int, default=128, help="tokens per calibration window (default 128)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    if args.recipe is not None and args.recipe not in RECIPES:
        parser.error(f"unknown recipe {args.recipe!r}; known recipes: {', '.join(RECIPES)}")
    if args.tokens < 1 or args.window < 1:
        parser.error("--tokens and --window must be >= 1")
    options: dict[str, Any] = {}
    if args.recipe is not None:
        options["recipe"] = args.recipe
    if args.pipeline is not None:
        options["pipeline"] = args.pipeline

    if args.model in TINY:
        family = FAMILIES[args.model.removeprefix("tiny-")]
        model = family.build()
        calibration = [family.inputs(seed, batch=1, seq=args.window) for seed in range(-(-args.tokens // args.window))]
    else:
        if args.model == "smollm2":
            model, tokenizer = zoo.load_smollm2()
            extra = {"use_cache": False}  # no KV cache output: v_proj rows can take o_proj's migration
        else:
            model, tokenizer = zoo.load_minilm()
            extra = {}
        windows = zoo.token_windows(tokenizer, "emma", args.tokens, args.window)
        calibration = [{"input_ids": ids, **extra} for ids in windows]
    report = explain(model, calibration[0], calibration=calibration, **options)
    print(report)
    if args.json:
        text = json.dumps(report.to_dict(), indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
