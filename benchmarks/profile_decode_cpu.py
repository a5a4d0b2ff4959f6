"""Where a q4 decode step's time goes: SmolLM2-135M, static cache, torch.profiler's table.

    python benchmarks/profile_decode_cpu.py [--recipe w4a4] [--new-tokens 65] [--rows 30]

Compiles the model's forward with the q4 backend (Inductor lowering), generates once to compile
the prompt and decode graphs at these shapes, prints the best ms per decode token of three
generates, then profiles one more generate and prints the ops by self CPU time. Numbers from
this script are in the README's "Generating text" section. Run it on idle cores (see
`qcompile.tools.bench`'s docstring on OMP_WAIT_POLICY).
"""

import argparse
import time

import torch
from torch.profiler import profile

from qcompile.tools import zoo
from qcompile.tools.generate import timed_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w4a4")
    parser.add_argument("--new-tokens", type=int, default=65, help="tokens per generate (the static cache's length)")
    parser.add_argument("--rows", type=int, default=30, help="rows of the profiler table")
    args = parser.parse_args()

    model, tokenizer = zoo.load_smollm2()
    calibration = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 1024, 512)]
    prompt = tokenizer(zoo.text("emma")[3000:6000], return_tensors="pt").input_ids[:, :64]
    model.forward = torch.compile(model.forward, backend="q4",
                                  options={"recipe": args.recipe, "calibration": calibration, "progress": False})
    start = time.perf_counter()
    timed_generate(model.generate, prompt, args.new_tokens, True, 0)  # compiles, at the timed shapes
    print(f"compile and first generate: {time.perf_counter() - start:.1f} s")
    steps = args.new_tokens - 1
    best = min(timed_generate(model.generate, prompt, args.new_tokens, True, 0)[2] for _ in range(3))
    print(f"{args.recipe} decode: {best / steps * 1e3:.2f} ms a token ({steps / best:.1f} tokens/s), best of 3")
    with profile() as prof:
        timed_generate(model.generate, prompt, args.new_tokens, True, 0)
    print(f"torch.profiler over one generate ({steps} decode steps and the prompt):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
