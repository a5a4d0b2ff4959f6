"""`qcompile generate`: quantize a causal LM, generate greedily from a prompt, print text and speed.

    qcompile generate --prompt "It is a truth" [--recipe w4a4] [--max-new-tokens 64] [--model smollm2|DIR]
                      [--calibration-batches 2] [--static-cache]

For a user who just wants to see a quantized model talk: the model is compiled with
`torch.compile(model, backend="q4", options=...)` and its `generate()` quantizes every step
(`qcompile.backends.generation`). The first `generate()` calibrates on 512-token windows of Emma,
runs the recipe and compiles (minutes for w4a4 on 2 cores; w4a16 is the quickest), so it is timed
apart; a second, identical `generate()` is the one whose time to first token and decode tokens/s
are printed.

`TokenClock` and `timed_generate` (when each new token came out of `generate()`) are shared with
`qcompile bench decode`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES
from qcompile.tools import zoo


class TokenClock(BaseStreamer):
    """A `generate(streamer=...)` that records when each step's tokens come out: the first `put`
    is the prompt, each later one a step's new tokens (one per sequence)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(generate: Callable[..., torch.Tensor], input_ids: torch.Tensor, new_tokens: int,
                   static_cache: bool, pad_token_id: int | None = None) -> tuple[torch.Tensor, float, float]:
    """Greedy `generate` of exactly `new_tokens` tokens: (sequences, seconds to the first new token,
    seconds of the tokens after the first). A step's time ends when its tokens come out."""
    clock = TokenClock()
    extra = {"cache_implementation": "static"} if static_cache else {}
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                       pad_token_id=pad_token_id, **extra)
    steps = clock.times[1:]  # times[0]: generate() handing over the prompt
    if len(steps) != new_tokens:
        raise RuntimeError(f"generate() made {len(steps)} steps, expected {new_tokens}")
    return out, steps[0] - start, steps[-1] - steps[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qcompile generate",
        description="Quantize a causal LM with the q4 backend, generate greedily from a prompt, "
                    "print the text, tokens/s and time to first token.")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE})")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (shipped) or a local Hugging Face model folder")
    parser.add_argument("--calibration-batches", type=int, default=2, help="512-token windows of Emma (default 2)")
    parser.add_argument("--static-cache", action="store_true", help="generate with cache_implementation='static'")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("--prompt is empty: give some text to continue")
    if args.recipe not in RECIPES:
        parser.error(f"unknown recipe {args.recipe!r}; known recipes: {', '.join(RECIPES)}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.calibration_batches < 1:
        parser.error(f"--calibration-batches must be positive, got {args.calibration_batches}")

    try:
        model, tokenizer = zoo.load_smollm2() if args.model == "smollm2" else zoo.load_causal_lm(args.model)
    except (FileNotFoundError, ModuleNotFoundError, OSError) as e:
        parser.error(str(e))
    calibration = [{"input_ids": ids}
                   for ids in zoo.token_windows(tokenizer, "emma", 512 * args.calibration_batches, 512)]
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    compiled = torch.compile(model, backend="q4", options={"recipe": args.recipe, "calibration": calibration})

    start = time.perf_counter()
    timed_generate(compiled.generate, input_ids, args.max_new_tokens, args.static_cache, pad)
    print(f"quantized ({args.recipe}) and compiled in {time.perf_counter() - start:.1f} s (the first generate)")
    out, first, rest = timed_generate(compiled.generate, input_ids, args.max_new_tokens, args.static_cache, pad)
    print(args.prompt + tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
    speed = f"{(args.max_new_tokens - 1) / rest:.1f} tokens/s after the first" if args.max_new_tokens > 1 else "-"
    print(f"{args.max_new_tokens} new tokens: {speed}; first token in {first * 1e3:.0f} ms "
          f"(prompt {input_ids.shape[1]} tokens, {torch.get_num_threads()} CPU threads, "
          f"{'static' if args.static_cache else 'dynamic'} cache)")


if __name__ == "__main__":
    main()
