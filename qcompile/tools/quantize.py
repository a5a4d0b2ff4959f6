"""`qcompile quantize`: quantize a causal LM on Emma, save the artifact, print a summary.

    qcompile quantize --out DIR [--model smollm2|FOLDER] [--recipe w4a4] [--calibration-tokens 4096]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from tabulate import tabulate

from qcompile.api.artifact import quantize
from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES
from qcompile.tools import zoo


def load_example(model: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): "smollm2" is the shipped SmolLM2-135M; anything else a local folder
    that transformers' AutoModelForCausalLM loads (nothing is downloaded)."""
    return zoo.load_smollm2() if model == "smollm2" else zoo.load_causal_lm(model)


def main(argv: list[str] | None = None) -> None:
    """`qcompile quantize`: calibrate on Emma, run the recipe, save the artifact, print a summary."""
    parser = argparse.ArgumentParser(
        prog="qcompile quantize",
        description="Quantize a causal LM (the shipped SmolLM2-135M or a local Hugging Face folder) and "
                    "save the artifact that qcompile.load(model, DIR) runs without calibration.")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (shipped) or a local model folder")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES))
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of Emma to calibrate on")
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration batch")
    parser.add_argument("--lower", default="inductor", choices=("inductor", "eager"), help="lowering of the first call")
    parser.add_argument("--out", required=True, help="directory to write the artifact to")
    args = parser.parse_args(argv)
    if args.calibration_tokens < 1 or args.window < 1:
        parser.error("--calibration-tokens and --window must be positive")

    try:
        model, tokenizer = load_example(args.model)
    except (FileNotFoundError, ModuleNotFoundError, OSError) as e:
        parser.error(str(e))
    calibration = [{"input_ids": ids, "use_cache": False}
                   for ids in zoo.token_windows(tokenizer, "emma", args.calibration_tokens, args.window)]
    qmodel = quantize(model, calibration, recipe=args.recipe, lower=args.lower)
    path = qmodel.save(args.out)
    graphs = qmodel.graphs
    rows = [
        ["model", args.model],
        ["recipe", qmodel.recipe],
        ["calibration", f"{sum(b['input_ids'].numel() for b in calibration)} tokens of Emma "
                        f"in {len(calibration)} batches"],
        ["graphs compiled", len(graphs)],
        ["quantized weight bytes", f"{sum(g.quantized_weight_bytes() for g in graphs):,}"],
        ["quantize seconds (first call included)", f"{qmodel.seconds:.1f}"],
        ["artifact", f"{path} ({path.stat().st_size:,} bytes)"],
    ]
    print(tabulate(rows, tablefmt="plain"))
    print(f"pipeline: {qmodel.pipeline}")
    print(f"load it: qcompile.load(model, {str(args.out)!r})  (no calibration)")

