"""The accuracy table: every recipe against FP32 on the shipped models, held-out text only.

    python -m qcompile.tools.accuracy [--tokens 65536] [--recipes w4a4-rtn,w4a4-smoothquant,w4a4,fp4]

SmolLM2-135M: perplexity on the first `--tokens` tokens of Pride and Prejudice (512-token
windows), ratio to FP32, and quantization time (capture + calibration + passes + lowering).
all-MiniLM-L6-v2: mean cosine similarity to FP32 of mean-pooled sentence embeddings over
`--sentences` sentences of Pride and Prejudice. Calibration uses Emma only: `--calibration-batches`
512-token windows for SmolLM2, `--calibration-sentences` sentences for MiniLM (512: GPTQ's Gram
matrix of MiniLM's 1536-wide FFN input wants more than 64 short sentences' 2k tokens; w4a8 with
groups of 32 went 0.9878 -> 0.9901 from 64 to 512).
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from qcompile.algorithms.metrics import mean_cosine, perplexity
from qcompile.core.recipes import RECIPES
from qcompile.tools import zoo


def sentences(name: str, count: int, skip: int = 0) -> list[str]:
    """`count` sentences (20 to 400 characters) of a vendored text, after the first `skip`."""
    text = " ".join(zoo.text(name).split())
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 400]
    return found[skip : skip + count]


def embed(model, tokenizer, texts: list[str], batch: int = 50) -> torch.Tensor:
    """L2-normalized mean-pooled last hidden states (sentence-transformers' all-MiniLM pooling)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def compile_q4(model, recipe: str, calibration: list, example: dict) -> tuple[torch.nn.Module, float]:
    """torch.compile with the q4 backend; the first call (timed) quantizes."""
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = torch.compile(model, backend="q4", options={"recipe": recipe, "calibration": calibration})
    with torch.no_grad():
        compiled(**example)
    return compiled, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qcompile eval", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="evaluation tokens of Pride and Prejudice")
    parser.add_argument("--calibration-batches", type=int, default=8, help="512-token batches of Emma")
    parser.add_argument("--sentences", type=int, default=200, help="MiniLM evaluation sentences")
    parser.add_argument("--calibration-sentences", type=int, default=512, help="MiniLM calibration sentences of Emma")
    parser.add_argument("--recipes", default="w4a4-rtn,w4a4-smoothquant,w4a4-hadamard,w4a4,w4a4-split,w4a4-dynamic,w4a8,w4a16,fp4,fp4-e2m1")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")

    rows = []
    model, tokenizer = zoo.load_smollm2()
    windows = zoo.token_windows(tokenizer, "pride_and_prejudice", args.tokens, 512)
    calibration = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 512 * args.calibration_batches, 512)]
    fp32 = perplexity(model, windows, desc="SmolLM2 FP32")
    rows.append(["SmolLM2-135M", "FP32", "perplexity", fp32, 1.0, None])
    for recipe in tqdm(recipes, desc="recipes", leave=False):
        compiled, seconds = compile_q4(model, recipe, calibration, {"input_ids": windows[0], "use_cache": False})
        ppl = perplexity(compiled, windows, desc=f"SmolLM2 {recipe}")
        rows.append(["SmolLM2-135M", recipe, "perplexity", ppl, ppl / fp32, seconds])
    del model

    bert, bert_tokenizer = zoo.load_minilm()
    held_out = sentences("pride_and_prejudice", args.sentences)
    calib_sentences = sentences("emma", args.calibration_sentences)
    calib = [dict(bert_tokenizer(calib_sentences[i : i + 16], padding=True, return_tensors="pt"))
             for i in range(0, len(calib_sentences), 16)]
    reference = embed(bert, bert_tokenizer, held_out)
    rows.append(["all-MiniLM-L6-v2", "FP32", "cosine to FP32", 1.0, None, None])
    for recipe in recipes:
        compiled, seconds = compile_q4(bert, recipe, calib, calib[0])
        cosine = mean_cosine(embed(compiled, bert_tokenizer, held_out), reference)
        rows.append(["all-MiniLM-L6-v2", recipe, "cosine to FP32", cosine, None, seconds])

    print()
    print(f"held-out Pride and Prejudice: SmolLM2 on the first {args.tokens} tokens, MiniLM on "
          f"{len(held_out)} sentences; calibration on Emma only ({args.calibration_batches} x 512 tokens, "
          f"{len(calib_sentences)} sentences); {torch.get_num_threads()} CPU threads")
    print(tabulate(rows, headers=["model", "recipe", "metric", "value", "ratio to FP32", "quantize s"],
                   floatfmt=("", "", "", ".4g", ".3g", ".1f")))


if __name__ == "__main__":
    main()
