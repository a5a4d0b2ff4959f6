"""Quantize SmolLM2-135M with the q4 backend and print a table against FP32.

    python examples/quantize_smollm2.py [--recipe w4a4] [--tokens 16384]

Perplexity is measured on the first `--tokens` tokens of Pride and Prejudice (held out); the
static activation scales are calibrated on Emma only. Everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

import qcompile.backends.q4 as q4_backend
from qcompile.algorithms.metrics import perplexity
from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES
from qcompile.tools import zoo


def prefill_seconds(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of one prefill over `ids`, no KV cache (after the caller's warm-up)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_weight_bytes(model) -> int:
    """Bytes of the FP32 weights of every linear: the decoder layers' and the head (which w4a4
    quantizes too; SmolLM2 ties it to the embedding, which stays in float for the lookup)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"one of {', '.join(RECIPES)}")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens of Pride and Prejudice")
    parser.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--calibration-batches", type=int, default=8, help="512-token batches of Emma")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = zoo.load_smollm2()
    evaluation = zoo.token_windows(tokenizer, "pride_and_prejudice", args.tokens, args.window)
    calibration = [
        {"input_ids": ids}
        for ids in zoo.token_windows(tokenizer, "emma", 512 * args.calibration_batches, 512)
    ]
    prompt = evaluation[0][:, :512]

    rows = []
    with torch.no_grad():
        model(input_ids=prompt, use_cache=False)  # warm-up
        fp32_ppl = perplexity(model, evaluation, desc="FP32 perplexity")
        rows.append(["FP32 (eager)", fp32_ppl, 1.0, None, prefill_seconds(model, prompt),
                     linear_weight_bytes(model)])

        start = time.perf_counter()
        compiled = torch.compile(model, backend="q4",
                                 options={"recipe": args.recipe, "calibration": calibration})
        compiled(input_ids=prompt, use_cache=False)  # the first call captures, calibrates, runs the passes, lowers
        compile_seconds = time.perf_counter() - start
        graph = q4_backend.compiled_graphs()[-1]
        q_ppl = perplexity(compiled, evaluation, desc=f"{args.recipe} perplexity")
        rows.append([f"q4 {args.recipe}", q_ppl, q_ppl / fp32_ppl, compile_seconds,
                     prefill_seconds(compiled, prompt), graph.quantized_weight_bytes()])

    print()
    print(f"SmolLM2-135M-Instruct, perplexity on the first {args.tokens} tokens of Pride and Prejudice "
          f"({args.window}-token windows); calibration: {len(calibration)} x 512 tokens of Emma; "
          f"{torch.get_num_threads()} CPU threads")
    print(tabulate(
        rows,
        headers=["model", "perplexity", "ppl / FP32", "compile+calibrate s", "prefill 512 tok s",
                 "linear weight bytes"],
        floatfmt=("", ".2f", ".2f", ".1f", ".3f", ""),
        intfmt=",",
    ))
    print(f"pipeline: {graph.pipeline}")
    print()
    print("Worst activation outliers (input channel absmax / median channel) of the linears:")
    print(graph.outlier_report(worst=8))


if __name__ == "__main__":
    main()
