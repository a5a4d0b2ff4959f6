"""SmolLM2-135M prefill of one sequence on CPU: FP32 eager, FP32 + Inductor, and q4 recipes,
measured side by side in one run.

    python benchmarks/bench_prefill_cpu.py [--tokens 512] [--recipes w4a4,w4a4-rtn] [--repeats 5]
    python benchmarks/bench_prefill_cpu.py --tiny      # a tiny random Llama (the CI smoke run)

Every variant is compiled and warmed up first; then each repetition calls every variant once, in
turn, so load from other processes hits all alike. The table shows the median seconds and the
speedup over FP32 eager (issue 5's target for q4 w4a4: >= 2x). Prefill runs without a KV cache
(`use_cache=False`). q4 is calibrated on 2 x 512 tokens of Emma (the tiny model: random tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from qcompile import zoo


def side_by_side_seconds(fns: list, repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:  # warm-up (the first call of a compiled model compiles)
            fn()
        for _ in range(repeats):
            for fn, ts in zip(fns, times):
                start = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="prompt length")
    parser.add_argument("--recipes", default="w4a4,w4a4-rtn", help="q4 recipes to time (comma list)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama instead of SmolLM2")
    args = parser.parse_args()

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
        prompt = torch.randint(0, 256, (1, args.tokens))
        calibration = [{"input_ids": torch.randint(0, 256, (1, args.tokens))}]
        name = "tiny Llama"
    else:
        model, tokenizer = zoo.load_smollm2()
        prompt = zoo.token_windows(tokenizer, "pride_and_prejudice", args.tokens, args.tokens)[0]
        calibration = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 1024, 512)]
        name = "SmolLM2-135M"

    variants = {"FP32 eager": model, "FP32 + Inductor": torch.compile(model)}
    for recipe in [r for r in args.recipes.split(",") if r]:
        variants[f"q4 {recipe}"] = torch.compile(
            model, backend="q4", options={"recipe": recipe, "calibration": calibration, "progress": False})
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(variants))
    fns = [lambda m=m: m(input_ids=prompt, use_cache=False) for m in variants.values()]
    seconds = side_by_side_seconds(fns, args.repeats)
    rows = [[label, s, seconds[0] / s] for label, s in zip(variants, seconds)]
    print(f"{name} prefill of {args.tokens} tokens, {torch.get_num_threads()} CPU threads, "
          f"median of {args.repeats} side-by-side repetitions")
    print(tabulate(rows, headers=["variant", "seconds", "speedup vs FP32 eager"], floatfmt=("", ".4f", ".2f")))


if __name__ == "__main__":
    main()
