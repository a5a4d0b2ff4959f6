"""Speed tables, every variant measured side by side in one run.

    python -m qcompile.tools.bench kernels [--m 1,16,128,2048,8192] [--shapes 4096x4096,...] [--repeats R]
    python -m qcompile.tools.bench prefill [--tokens 512] [--recipes w4a4,w4a4-rtn] [--repeats 5] [--tiny]
    python -m qcompile.tools.bench artifact [--recipe w4a4] [--calibration-tokens 4096] [--prompt-tokens 256]

kernels: one quantized linear on Llama-2-7B shapes (K x N) for each M.
  CPU: FP32 `F.linear` against the q4 CPU paths as a compiled model runs them, lowered through
  the backend's Inductor lowering: W4A4 is the static activation quantize and `q4.linear_w4a4`
  from a float input to a float output, W4A16 is `q4.linear_w4a16` (float input). Up to
  cpu_kernels.SMALL_M rows both call the q4_cpu C++ kernels, which read the packed weight
  (the `path` column); above, unpack + oneDNN int8 GEMM + fused epilogue (W4A16: dequantize +
  FP32 GEMM). On cores shared with another busy process, OpenMP's spin-waiting makes each small
  parallel loop wait for a descheduled thread (M = 1: 0.3 ms becomes ~7 ms, FP32 too): measure
  there with OMP_WAIT_POLICY=PASSIVE.
  CUDA: FP16 `torch.matmul` (cuBLAS) against the Triton W4A4 GEMM (int8 codes in), the Triton
  W4A16 GEMM (FP16 in), and torchao's int4 weight-only linear when torchao is importable.
prefill: SmolLM2-135M (or a tiny random Llama) prefill of one sequence: FP32 eager, FP32 +
  Inductor, and q4 recipes; the target for q4 `w4a4` on CPU is 2x FP32 eager.

artifact: how long `qcompile.quantize` takes (calibration, passes, compile, first call) against
  `qcompile.load` of its saved artifact in fresh processes (no calibration; with and without the
  compiled kernels it carries), and whether the loaded model's logits equal the quantized
  model's bit for bit; the target is < 25%.

Each repetition calls every variant once, in turn, so load from other processes hits all alike;
tables show the median after a warm-up call (which compiles).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tabulate import tabulate

LLAMA2_7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288))  # (K, N)
M_VALUES = (1, 16, 128, 2048, 8192)


def side_by_side_seconds(fns: list[Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None
                         ) -> list[float]:
    """Median seconds of each function, after one warm-up call each, calling them in turn."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn()
        sync()
        for _ in range(repeats):
            for fn, ts in zip(fns, times):
                start = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


# --- kernels -------------------------------------------------------------------------------------


def _quantized_weight(k: int, n: int, device: str):
    from qcompile.kernels import int4

    codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k))
    return int4.pack_int4(codes).to(device), w_step.to(device)


def _cpu_q4_linear(x: torch.Tensor, packed: torch.Tensor, w_step: torch.Tensor) -> Callable[[], torch.Tensor]:
    """quantize -> linear_w4a4 from float x, lowered the way the backend lowers a graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qcompile.backends.lowering import lower

    q4 = torch.ops.q4
    a_step = (x.abs().max() / 7).float()  # a calibrated static step, fixed before the timed calls

    def q4_linear(x, packed, w_step, a_step):
        return q4.linear_w4a4(q4.quantize_per_tensor(x, a_step, 4), packed, w_step, a_step, None, torch.float32)

    args = [x, packed, w_step, a_step]
    run = lower(make_fx(q4_linear)(*args), args, "inductor", "auto", None)
    return lambda: run(*args)


def _cpu_q4_weight_only_linear(x: torch.Tensor, packed: torch.Tensor, w_step: torch.Tensor
                               ) -> Callable[[], torch.Tensor]:
    """linear_w4a16 from float x, lowered the way the backend lowers a graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qcompile.backends.lowering import lower

    def q4_linear(x, packed, w_step):
        return torch.ops.q4.linear_w4a16(x, packed, w_step, None, torch.float32)

    args = [x, packed, w_step]
    run = lower(make_fx(q4_linear)(*args), args, "inductor", "auto", None)
    return lambda: run(*args)


def _cuda_variants(x16: torch.Tensor, k: int, n: int, packed: torch.Tensor, w_step: torch.Tensor) -> dict:
    from qcompile.kernels import triton_gemm

    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
    codes = torch.randint(-8, 8, x16.shape, device="cuda", dtype=torch.int8)
    a_step = torch.tensor(0.01, device="cuda")
    variants = {
        "FP16 cuBLAS": lambda: torch.matmul(x16, w16.t()),
        "q4 W4A4 (triton)": lambda: triton_gemm.linear_w4a4(codes, packed, w_step, a_step, None, torch.float16),
        "q4 W4A16 (triton)": lambda: triton_gemm.linear_w4a16(x16, packed, w_step, None),
    }
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        layer = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        quantize_(layer, Int4WeightOnlyConfig(group_size=128))
        x_bf16 = x16.to(torch.bfloat16)
        variants["torchao int4 weight-only"] = lambda: layer(x_bf16)
    except Exception as e:  # noqa: BLE001 - optional comparison: say why it is missing
        print(f"(torchao int4 weight-only not measured: {type(e).__name__}: {str(e)[:120]})")
    return variants


def bench_kernels(shapes: list[tuple[int, int]], m_values: list[int], repeats: int, device: str) -> str:
    rows, headers = [], None
    for k, n in shapes:
        packed, w_step = _quantized_weight(k, n, device)
        for m in m_values:
            torch.manual_seed(m)
            if device == "cuda":
                x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
                variants = _cuda_variants(x16, k, n, packed, w_step)
                seconds = side_by_side_seconds(list(variants.values()), repeats, torch.cuda.synchronize)
            else:
                from qcompile.kernels import cpu_kernels

                x, w = torch.randn(m, k), torch.randn(n, k)
                variants = {"FP32 F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                            "q4 W4A4 (CPU)": _cpu_q4_linear(x, packed, w_step),
                            "q4 W4A16 (CPU)": _cpu_q4_weight_only_linear(x, packed, w_step)}
                seconds = side_by_side_seconds(list(variants.values()), repeats)
                path = "q4_cpu" if cpu_kernels.use_for(m) else "GEMM"
            base = seconds[0]
            names = list(variants)
            headers = headers or ["K", "N", "M", *(["path"] if device != "cuda" else []),
                                  *(f"{v} ms" for v in names), *(f"{v} speedup" for v in names[1:])]
            rows.append([k, n, m, *([path] if device != "cuda" else []), *(s * 1e3 for s in seconds),
                         *(base / s for s in seconds[1:])])
    return tabulate(rows, headers=headers, floatfmt=".3f")


# --- prefill -------------------------------------------------------------------------------------


def bench_prefill(tokens: int, recipes: list[str], repeats: int, tiny: bool) -> str:
    from qcompile.tools import zoo

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
        prompt = torch.randint(0, 256, (1, tokens))
        calibration = [{"input_ids": torch.randint(0, 256, (1, tokens))}]
        name = "tiny Llama"
    else:
        model, tokenizer = zoo.load_smollm2()
        prompt = zoo.token_windows(tokenizer, "pride_and_prejudice", tokens, tokens)[0]
        calibration = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 1024, 512)]
        name = "SmolLM2-135M"

    variants = {"FP32 eager": model, "FP32 + Inductor": torch.compile(model)}
    for recipe in recipes:
        variants[f"q4 {recipe}"] = torch.compile(
            model, backend="q4", options={"recipe": recipe, "calibration": calibration, "progress": False})
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(variants))
    fns = [lambda m=m: m(input_ids=prompt, use_cache=False) for m in variants.values()]
    seconds = side_by_side_seconds(fns, repeats)
    rows = [[label, s, seconds[0] / s] for label, s in zip(variants, seconds)]
    title = (f"{name} prefill of {tokens} tokens (use_cache=False), {torch.get_num_threads()} CPU threads, "
             f"median of {repeats} side-by-side repetitions; q4 calibrated on {len(calibration)} batches")
    return title + "\n" + tabulate(rows, headers=["variant", "seconds", "speedup vs FP32 eager"],
                                   floatfmt=("", ".4f", ".2f"))


# --- artifact ------------------------------------------------------------------------------------


def bench_artifact(recipe: str, calibration_tokens: int, prompt_tokens: int, directory: str,
                   compiling_load: bool = True) -> str:
    """Quantize SmolLM2 here (timed: `qcompile.quantize` to the first logits), save, then load in
    fresh processes (timed: `qcompile.load` to the first logits), with and without the compiled
    kernels the artifact carries, and compare the logits. Every process starts from an empty
    Inductor cache of its own, so nothing is reused behind the table's back."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import qcompile
    from qcompile.frontend import saved_artifact
    from qcompile.tools import zoo

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-quantize")
        model, tokenizer = zoo.load_smollm2()
        calibration = [{"input_ids": ids, "use_cache": False}
                       for ids in zoo.token_windows(tokenizer, "emma", calibration_tokens, 512)]
        prompt = {"input_ids": zoo.token_windows(tokenizer, "pride_and_prejudice", prompt_tokens, prompt_tokens)[0],
                  "use_cache": False}
        qmodel = qcompile.quantize(model, calibration, recipe=recipe, example_inputs=prompt, progress=False)
        with torch.no_grad():
            expected = qmodel(**prompt).logits
        saved = qmodel.save(directory)
        torch.save(prompt, tmp / "prompt.pt")
        without = tmp / "without-kernels"
        shutil.copytree(directory, without)
        (without / saved_artifact.KERNEL_CACHE_FILE_NAME).unlink(missing_ok=True)

        rows = [["quantize (calibrate + passes + compile + first call)", qmodel.seconds, 1.0, "-", "-"]]
        loads = [("load, new process, with the artifact's compiled kernels", directory)]
        if compiling_load:
            loads.append(("load, new process, compiling its kernels itself", without))
        for label, source in loads:
            work = tmp / f"work-{len(rows)}"
            work.mkdir()
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
            subprocess.run([sys.executable, "-m", "qcompile.tools.bench", "load-artifact", str(source), str(work),
                            str(tmp / "prompt.pt")], check=True, env=env)
            result = json.loads((work / "result.json").read_text())
            exact = torch.equal(torch.load(work / "logits.pt"), expected)
            rows.append([label, result["seconds"], result["seconds"] / qmodel.seconds, "yes" if exact else "NO",
                         "YES (a bug)" if result["calibrated"] else "none"])
    size = sum(f.stat().st_size for f in Path(directory).iterdir())
    title = (f"SmolLM2-135M {recipe}, calibration {sum(b['input_ids'].numel() for b in calibration)} tokens of Emma, "
             f"first call {prompt_tokens} tokens, {torch.get_num_threads()} CPU threads, each process with an empty "
             f"Inductor cache; artifact {size:,} bytes ({saved.name} + compiled kernels)")
    return title + "\n" + tabulate(rows, headers=["step", "seconds", "ratio to quantize", "logits bit-exact",
                                                  "calibration"], floatfmt=("", ".1f", ".3f"))


def load_artifact(directory: str, work: str, prompt_file: str) -> None:
    """A fresh process of `bench artifact`: load, run the prompt, write seconds and logits."""
    import json
    from pathlib import Path

    import qcompile
    from qcompile.frontend import calibrate
    from qcompile.tools import zoo

    model, _ = zoo.load_smollm2()
    prompt = torch.load(prompt_file)
    calibrated = []  # any calibration in this process would be a bug: record it
    for name in ("observe", "observe_model"):
        original = getattr(calibrate, name)
        setattr(calibrate, name, lambda *a, _f=original, **k: calibrated.append(1) or _f(*a, **k))
    start = time.perf_counter()
    loaded = qcompile.load(model, directory, progress=False)
    with torch.no_grad():
        logits = loaded(**prompt).logits
    seconds = time.perf_counter() - start
    torch.save(logits, Path(work) / "logits.pt")
    (Path(work) / "result.json").write_text(json.dumps({"seconds": seconds, "calibrated": bool(calibrated)}))


# --- command line --------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(k), int(n)) for k, n in (s.lower().split("x") for s in text.split(",") if s)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shapes are KxN pairs separated by commas (4096x11008), got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qcompile bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    kernels = sub.add_parser("kernels", help="one quantized linear against FP32 (CPU) or FP16 cuBLAS (CUDA)")
    kernels.add_argument("--shapes", type=_shapes, default=list(LLAMA2_7B_SHAPES),
                         help="KxN pairs (default: Llama-2-7B's 4096x4096,4096x11008,11008x4096,4096x12288)")
    kernels.add_argument("--m", type=_ints, default=list(M_VALUES), help="rows of the activation (default 1,16,128,2048,8192)")
    kernels.add_argument("--repeats", type=int, default=5)
    kernels.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    prefill = sub.add_parser("prefill", help="SmolLM2-135M prefill: FP32 eager, FP32 + Inductor, q4 recipes")
    prefill.add_argument("--tokens", type=int, default=512, help="prompt length")
    prefill.add_argument("--recipes", default="w4a4,w4a4-rtn", help="q4 recipes (comma list)")
    prefill.add_argument("--repeats", type=int, default=5)
    prefill.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama instead of SmolLM2")
    artifact = sub.add_parser("artifact", help="SmolLM2: quantize time against loading the saved artifact in a new process")
    artifact.add_argument("--recipe", default="w4a4")
    artifact.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of Emma (512-token batches)")
    artifact.add_argument("--prompt-tokens", type=int, default=256, help="tokens of the first call")
    artifact.add_argument("--dir", default="q4-artifact-bench", help="where to save the artifact")
    artifact.add_argument("--no-compiling-load", action="store_true",
                          help="skip the load that compiles its kernels itself (the slow row)")
    internal = sub.add_parser("load-artifact", help="(internal) the fresh process of `bench artifact`")
    internal.add_argument("directory")
    internal.add_argument("work")
    internal.add_argument("prompt")
    args = parser.parse_args(argv)

    if args.command == "artifact":
        print(bench_artifact(args.recipe, args.calibration_tokens, args.prompt_tokens, args.dir,
                             not args.no_compiling_load))
    elif args.command == "load-artifact":
        load_artifact(args.directory, args.work, args.prompt)
    elif args.command == "kernels":
        where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"q4 linear vs {'FP16 cuBLAS' if args.device == 'cuda' else 'FP32'} on {where}, torch {torch.__version__}, "
              f"median of {args.repeats} side-by-side repetitions")
        print(bench_kernels(args.shapes, args.m, args.repeats, args.device))
    else:
        print(bench_prefill(args.tokens, [r for r in args.recipes.split(",") if r], args.repeats, args.tiny))


if __name__ == "__main__":
    main()
