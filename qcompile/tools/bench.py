"""Speed tables, every variant measured side by side in one run.

    python -m qcompile.tools.bench kernels [--m 1,16,128,2048,8192] [--shapes 4096x4096,...] [--repeats R]
    python -m qcompile.tools.bench prefill [--tokens 512] [--recipes w4a4,w4a4-rtn] [--repeats 5] [--tiny]
    python -m qcompile.tools.bench decode [--prompt-tokens 64] [--new-tokens 128] [--batch 1,4]
                                          [--recipes w4a4,w4a8,w4a16] [--repeats 3] [--calibration-batches 2] [--tiny]
    python -m qcompile.tools.bench artifact [--recipe w4a4] [--calibration-tokens 4096] [--prompt-tokens 256]
    python -m qcompile.tools.bench memory [--recipe w4a4] [--calibration-tokens 4096] [--window 512]
                                          [--lower eager|inductor] [--tiny]

kernels: one quantized linear on Llama-2-7B shapes (K x N) for each M.
  CPU: FP32 `F.linear` against the q4 CPU paths as a compiled model runs them, lowered through
  the backend's Inductor lowering: W4A4 is the static activation quantize and `q4.linear_w4a4`
  from a float input to a float output, W4A16 is `q4.linear_w4a16` (float input). Up to
  cpu_kernels.SMALL_M rows (W4A16: SMALL_M_W4A16) they call the q4_cpu C++ kernels, which read
  the packed weight (the `path` column); above, unpack + oneDNN int8 GEMM + fused epilogue
  (W4A16: dequantize + FP32 GEMM). On cores shared with another busy process, OpenMP's
  spin-waiting makes each small parallel loop wait for a descheduled thread (M = 1: 0.3 ms
  becomes ~7 ms, FP32 too): measure there with OMP_WAIT_POLICY=PASSIVE.
  CUDA: FP16 `torch.matmul` (cuBLAS) against the Triton W4A4 GEMM (int8 codes in), the Triton
  W4A16 GEMM (FP16 in), and torchao's int4 weight-only linear when torchao is importable.
prefill: SmolLM2-135M (or a tiny random Llama) prefill of one sequence: FP32 eager, FP32 +
  Inductor, torchao int8 dynamic-activation + Inductor (when torchao is importable: the extra
  `qcompile[peers]`) and q4 recipes, each called bare (`use_cache=False`) and as the default call
  that also fills a KV cache; the target for q4 `w4a4` on CPU is 2x FP32 eager and at least torchao.
decode: greedy `generate()` of SmolLM2-135M (or a tiny random Llama) at each batch size: decode
  tokens/s, time to first token, the linears' weight bytes and peak memory of FP32 eager (dynamic
  cache), FP32 + Inductor, torchao int8-dynamic / int8 and int4 weight-only + Inductor (when
  importable; a config that fails on this torch says why in its row) and q4 recipes, the compiled
  ones with a static cache and `dynamic=False`. Each row runs in a fresh process, so its peak
  memory is its own (the rows run one after another, not interleaved); targets for q4 `w4a4` at
  batch 1: 5x FP32 eager, 1.5x FP32 + Inductor, 1.3x torchao int8-dynamic. On cores shared with
  another busy process, measure with OMP_WAIT_POLICY=PASSIVE (see kernels): a decode step is
  hundreds of small parallel loops, each of which can wait on a descheduled spinning thread.

artifact: how long `qcompile.quantize` takes (calibration, passes, compile, first call) against
  `qcompile.load` of its saved artifact in fresh processes (no calibration): with
  `trust_compiled=True` (the compiled kernels it carries, pickled code) and by default (compiling
  them), and whether the loaded model's logits equal the quantized
  model's bit for bit; the target is < 25%.

memory: peak memory of `qcompile.quantize` (calibration, passes, first call) of SmolLM2-135M (or a
  tiny random Llama) against the FP32 model's size, in a fresh process: the baseline is its
  resident memory after the imports, before the model loads; M the model's parameter bytes; A
  one calibration batch of activations (the peak of a plain FP32 forward of the first batch above
  the loaded model); the quantize peak is above the baseline, so it holds the model itself. The
  target is 2M + A: the model, one more copy of its weights (statistics, quantized constants),
  and one batch in flight. Lowering is eager by default, so the number is about quantizing, not
  about Inductor's compile (--lower inductor measures that too). Linux only for the peaks (a
  reset of VmHWM); elsewhere they are the whole process's. With `Q4_MEMORY=1` the quantizing
  process also prints resident memory after each stage and pass and which one raised the peak.

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

from qcompile.core.instrument import status_bytes
from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES

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
                path = "/".join("q4_cpu" if cpu_kernels.use_for(m, limit) else "GEMM"
                                for limit in (cpu_kernels.SMALL_M, cpu_kernels.SMALL_M_W4A16))
            base = seconds[0]
            names = list(variants)
            headers = headers or ["K", "N", "M", *(["path W4A4/W4A16"] if device != "cuda" else []),
                                  *(f"{v} ms" for v in names), *(f"{v} speedup" for v in names[1:])]
            rows.append([k, n, m, *([path] if device != "cuda" else []), *(s * 1e3 for s in seconds),
                         *(base / s for s in seconds[1:])])
    return tabulate(rows, headers=headers, floatfmt=".3f")


# --- prefill -------------------------------------------------------------------------------------


def _tiny_llama():
    """A tiny random-weight Llama (for tests of the tables, not for speed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _torchao_int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` with torchao's int8 dynamic-activation, int8-weight linears."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    copied = copy.deepcopy(model)
    quantize_(copied, Int8DynamicActivationInt8WeightConfig())
    return copied


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def bench_prefill(tokens: int, recipes: list[str], repeats: int, tiny: bool) -> str:
    from qcompile.tools import zoo

    if tiny:
        model = _tiny_llama()
        prompt = torch.randint(0, 256, (1, tokens))
        calibration = [{"input_ids": torch.randint(0, 256, (1, tokens))}]
        name = "tiny Llama"
    else:
        model, tokenizer = zoo.load_smollm2()
        prompt = zoo.token_windows(tokenizer, "pride_and_prejudice", tokens, tokens)[0]
        calibration = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 1024, 512)]
        name = "SmolLM2-135M"

    variants = {"FP32 eager": model, "FP32 + Inductor": torch.compile(model)}
    if torchao_available():
        variants["torchao int8-dynamic + Inductor"] = torch.compile(_torchao_int8_dynamic(model))
    for recipe in recipes:
        variants[f"q4 {recipe}"] = torch.compile(
            model, backend="q4", options={"recipe": recipe, "calibration": calibration, "progress": False})
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(variants))
    # the bare forward (use_cache=False) and the default call, which also fills a new KV cache
    fns = [lambda m=m, c=cache: m(input_ids=prompt, use_cache=c) for cache in (False, True) for m in variants.values()]
    seconds = side_by_side_seconds(fns, repeats)
    bare, cached = seconds[:len(variants)], seconds[len(variants):]
    rows = [[label, b, bare[0] / b, c, cached[0] / c] for label, b, c in zip(variants, bare, cached)]
    title = (f"{name} prefill of {tokens} tokens, {torch.get_num_threads()} CPU threads, "
             f"median of {repeats} side-by-side repetitions; q4 calibrated on {len(calibration)} batches"
             + ("" if torchao_available() else "; torchao not installed (pip install 'qcompile[peers]')"))
    return title + "\n" + tabulate(rows, headers=["variant", "use_cache=False s", "speedup vs FP32 eager",
                                                  "use_cache=True s", "speedup vs FP32 eager"],
                                   floatfmt=("", ".4f", ".2f", ".4f", ".2f"))


# --- decode --------------------------------------------------------------------------------------

TORCHAO_CONFIGS = {  # row label -> the torchao config's constructor, for CPU
    "torchao int8-dynamic": lambda ao: ao.Int8DynamicActivationInt8WeightConfig(),
    "torchao int8 weight-only": lambda ao: ao.Int8WeightOnlyConfig(),
    "torchao int4 weight-only": lambda ao: ao.Int4WeightOnlyConfig(group_size=128),
}


def decode_variants(recipes: list[str]) -> list[str]:
    """The rows of `bench decode`, in order (torchao's only when torchao is importable)."""
    return ["FP32 eager", "FP32 + Inductor", *(TORCHAO_CONFIGS if torchao_available() else ()),
            *(f"q4 {r}" for r in recipes)]


def _storage_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes of the plain tensors behind `t` (a tensor subclass's inner tensors, recursively),
    each storage counted once."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n), seen) for n in names)
    if t.data_ptr() in seen:
        return 0
    seen.add(t.data_ptr())
    return t.numel() * t.element_size()


def _linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the nn.Linear weights as the model holds them (tensor subclasses: their inner tensors)."""
    seen: set[int] = set()
    return sum(_storage_bytes(m.weight, seen) for m in model.modules() if isinstance(m, torch.nn.Linear))


def _q4_weight_bytes(graphs: list) -> int:
    """Bytes of the linears' weights in q4's compiled graphs: the constants q4 ops read (packed
    int4 weights and their steps, `CompiledGraph.quantized_weight_bytes`) plus the weights of
    linears left in float; a storage shared by several graphs (prefill, decode) counted once."""
    from qcompile.core import ir, qlinear

    seen: set[int] = set()
    total = 0
    for graph in graphs:
        gm = graph.graph_module
        for n in gm.graph.nodes:
            q = qlinear.match(n)
            reads = []
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "q4":
                reads = list(n.args)
            elif q is not None and q.form == qlinear.FLOAT:
                reads = [q.weight]
            for arg in reads:
                t = ir.get_constant(gm, arg)
                if t is not None:
                    total += _storage_bytes(t, seen)
    return total


def _peak_rss_reset() -> bool:
    """Reset this process's peak resident set (Linux: /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident set since the last reset (VmHWM), or since the start (ru_maxrss) without /proc."""
    peak = status_bytes("VmHWM")
    if peak is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def _decode_inputs(spec: dict):
    """(model, prompts by batch size, calibration batches, pad token id) for a decode row."""
    from qcompile.tools import zoo

    if spec["tiny"]:
        model = _tiny_llama()
        gen = torch.Generator().manual_seed(1)
        prompts = {b: torch.randint(0, 256, (b, spec["prompt_tokens"]), generator=gen) for b in spec["batches"]}
        calibration = [{"input_ids": torch.randint(0, 256, (1, 64), generator=gen)}
                       for _ in range(spec["calibration_batches"])]
        return model, prompts, calibration, 0
    model, tokenizer = zoo.load_smollm2()
    p, most = spec["prompt_tokens"], max(spec["batches"])
    windows = zoo.token_windows(tokenizer, "pride_and_prejudice", p * most, p)  # one passage per sequence
    prompts = {b: torch.cat(windows[:b]) for b in spec["batches"]}
    calibration = [{"input_ids": ids}
                   for ids in zoo.token_windows(tokenizer, "emma", 512 * spec["calibration_batches"], 512)]
    return model, prompts, calibration, tokenizer.eos_token_id


def _decode_variant(variant: str, model: torch.nn.Module, calibration: list) -> tuple[bool, Callable[[], int]]:
    """Make `model` the row's variant, in place: (static cache?, weight bytes once warmed up)."""
    if variant == "FP32 eager":
        return False, lambda: _linear_weight_bytes(model)
    if variant == "FP32 + Inductor":
        model.forward = torch.compile(model.forward, dynamic=False)
        return True, lambda: _linear_weight_bytes(model)
    if variant in TORCHAO_CONFIGS:
        import torchao.quantization as ao

        ao.quantize_(model, TORCHAO_CONFIGS[variant](ao))
        model.forward = torch.compile(model.forward, dynamic=False)
        return True, lambda: _linear_weight_bytes(model)
    from qcompile.backends import q4 as q4_backend

    recipe = variant.removeprefix("q4 ")
    model.forward = torch.compile(model.forward, backend="q4", dynamic=False,
                                  options={"recipe": recipe, "calibration": calibration, "progress": False})
    return True, lambda: _q4_weight_bytes(q4_backend.compiled_graphs())


def decode_row(spec: dict) -> dict:
    """One row of `bench decode`, in this (fresh) process: build the variant, then per batch size
    a warm-up generate (compiles) and `repeats` timed ones. Errors become the row's `error`."""
    from qcompile.tools.generate import timed_generate

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model, prompts, calibration, pad = _decode_inputs(spec)
    result: dict = {"variant": spec["variant"], "batches": {}}
    try:
        static, weight_bytes = _decode_variant(spec["variant"], model, calibration)
        for batch, ids in prompts.items():
            run = lambda ids=ids: timed_generate(model.generate, ids, spec["new_tokens"], static, pad)  # noqa: E731
            run()  # warm-up: compiles (and for q4, quantizes) at these shapes
            resettable = _peak_rss_reset()
            times = [run()[1:] for _ in range(spec["repeats"])]
            result["batches"][batch] = {
                "ttft": statistics.median(t[0] for t in times),
                "decode": statistics.median(t[1] for t in times),
                "peak_rss": _peak_rss_bytes(), "peak_reset": resettable}
        result["weight_bytes"] = weight_bytes()
    except Exception as e:  # noqa: BLE001 - the row says why it has no numbers
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:70] if str(e) else ''}"
    return result


def fresh_process_row(module: str, command: str, spec: dict, missing: dict) -> dict:
    """`python -m module command <spec as JSON> <file>` in a fresh Python process (its own peak
    memory, compile caches and torch state): the JSON it wrote to the file, or `missing` with an
    `error` naming the process's last line when it wrote none."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        proc = subprocess.run([sys.executable, "-m", module, command, json.dumps(spec), out],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {**missing, "error": f"process failed ({proc.returncode}): {last[:70]}"}
        with open(out) as f:
            return json.load(f)


def _run_decode_row(spec: dict) -> dict:
    """`decode_row` in a fresh Python process."""
    result = fresh_process_row("qcompile.tools.bench", "decode-row", spec, {"variant": spec["variant"], "batches": {}})
    result["batches"] = {int(b): v for b, v in result["batches"].items()}
    return result


def bench_decode(prompt_tokens: int, new_tokens: int, batches: list[int], recipes: list[str], repeats: int,
                 calibration_batches: int, tiny: bool) -> str:
    import sys

    spec = {"tiny": tiny, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batches": batches,
            "repeats": repeats, "calibration_batches": calibration_batches}
    results = []
    for variant in decode_variants(recipes):
        print(f"bench decode: {variant} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results.append(_run_decode_row({**spec, "variant": variant}))
        print(f"bench decode: {variant} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    eager = results[0]["batches"]
    rows = []
    for batch in batches:
        for r in results:
            label = r["variant"] + ("" if "error" in r or r["variant"] == "FP32 eager" else " (static cache)")
            m = r["batches"].get(batch)
            if m is None:
                rows.append([label, batch, r.get("error", "no result"), *[""] * 5])
                continue
            tps = batch * (new_tokens - 1) / m["decode"]
            base = eager.get(batch)
            base_tps = batch * (new_tokens - 1) / base["decode"] if base else None
            weight = r.get("weight_bytes")
            rows.append([label, batch, f"{tps:.1f}", f"{tps / base_tps:.2f}" if base else "",
                         f"{m['ttft'] * 1e3:.1f}", f"{base['ttft'] / m['ttft']:.2f}" if base else "",
                         f"{weight / 2**20:.2f}" if weight else "", f"{m['peak_rss'] / 2**20:.0f}"
                         + ("" if m["peak_reset"] else " (whole process)")])
    name = "tiny random Llama" if tiny else "SmolLM2-135M"
    title = (f"{name} greedy generate: {prompt_tokens}-token prompt, {new_tokens} new tokens (min = max), "
             f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, median of {repeats} after a "
             f"warm-up generate at the same shapes; each row in a fresh process; q4 calibrated on "
             f"{calibration_batches} batches"
             + ("" if torchao_available() else "; torchao not installed (pip install 'qcompile[peers]')"))
    notes = ("decode tok/s = batch x (new tokens - 1) / time from the first new token to the last; "
             "TTFT = generate() call to the first new token; weight MiB = the linears' weights as the model "
             "holds them (FP32: nn.Linear weights; torchao: the tensor subclasses' inner tensors; q4: packed "
             "int4 weights + steps in the compiled graphs + linears left in float), tied storage counted once; "
             "peak RSS = the process's peak resident memory during the timed generates (VmHWM after a reset), "
             "which includes torch itself and, for q4, the float model the compiled graphs were made from")
    table = tabulate(rows, headers=["variant", "batch", "decode tok/s", "decode vs FP32 eager", "TTFT ms", "TTFT vs FP32 eager",
                                    "weight MiB", "peak RSS MiB"], disable_numparse=True)
    import textwrap

    return title + "\n" + table + "\n" + textwrap.fill(notes, 120)


# --- artifact ------------------------------------------------------------------------------------


def bench_artifact(recipe: str, calibration_tokens: int, prompt_tokens: int, directory: str,
                   compiling_load: bool = True) -> str:
    """Quantize SmolLM2 here (timed: `qcompile.quantize` to the first logits), save, then load in
    fresh processes (timed: `qcompile.load` to the first logits), with and without the compiled
    kernels the artifact carries, and compare the logits. Every process starts from an empty
    Inductor cache of its own, so nothing is reused behind the table's back."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import qcompile
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

        rows = [["quantize (calibrate + passes + compile + first call)", qmodel.seconds, 1.0, "-", "-"]]
        loads = [("load, new process, trust_compiled=True (the artifact's compiled kernels)", True)]
        if compiling_load:
            loads.append(("load, new process, default (compiles its kernels itself)", False))
        for label, trust in loads:
            work = tmp / f"work-{len(rows)}"
            work.mkdir()
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
            subprocess.run([sys.executable, "-m", "qcompile.tools.bench", "load-artifact", str(directory), str(work),
                            str(tmp / "prompt.pt"), *(["--trust-compiled"] if trust else [])], check=True, env=env)
            result = json.loads((work / "result.json").read_text())
            exact = torch.equal(torch.load(work / "logits.pt", weights_only=True), expected)
            rows.append([label, result["seconds"], result["seconds"] / qmodel.seconds, "yes" if exact else "NO",
                         "YES (a bug)" if result["calibrated"] else "none"])
    size = sum(f.stat().st_size for f in Path(directory).iterdir())
    title = (f"SmolLM2-135M {recipe}, calibration {sum(b['input_ids'].numel() for b in calibration)} tokens of Emma, "
             f"first call {prompt_tokens} tokens, {torch.get_num_threads()} CPU threads, each process with an empty "
             f"Inductor cache; artifact {size:,} bytes ({saved.name} + compiled kernels)")
    return title + "\n" + tabulate(rows, headers=["step", "seconds", "ratio to quantize", "logits bit-exact",
                                                  "calibration"], floatfmt=("", ".1f", ".3f"))


def load_artifact(directory: str, work: str, prompt_file: str, trust_compiled: bool) -> None:
    """A fresh process of `bench artifact`: load, run the prompt, write seconds and logits."""
    import json
    from pathlib import Path

    import qcompile
    from qcompile.frontend import calibrate
    from qcompile.tools import zoo

    model, _ = zoo.load_smollm2()
    prompt = torch.load(prompt_file, weights_only=True)
    calibrated = []  # any calibration in this process would be a bug: record it
    for name in ("observe", "observe_model"):
        original = getattr(calibrate, name)
        setattr(calibrate, name, lambda *a, _f=original, **k: calibrated.append(1) or _f(*a, **k))
    start = time.perf_counter()
    loaded = qcompile.load(model, directory, progress=False, trust_compiled=trust_compiled)
    with torch.no_grad():
        logits = loaded(**prompt).logits
    seconds = time.perf_counter() - start
    torch.save(logits, Path(work) / "logits.pt")
    (Path(work) / "result.json").write_text(json.dumps({"seconds": seconds, "calibrated": bool(calibrated)}))


# --- memory --------------------------------------------------------------------------------------


def _settle() -> int:
    """Collect garbage and give freed memory back to the system, so the next peak starts from
    live memory only (glibc keeps freed blocks resident until asked); returns the RSS then."""
    import gc

    from qcompile.core.memory import release_freed_memory

    gc.collect()
    release_freed_memory()
    return status_bytes("VmRSS") or 0


def memory_row(spec: dict) -> dict:
    """`bench memory` in this (fresh) process: baseline RSS after the imports, the model's bytes,
    one batch's activations, then the peak while quantizing (first call included)."""
    import torch._dynamo  # noqa: F401 - imported before the baseline: quantize's imports are not its memory
    import transformers.models.llama.modeling_llama  # noqa: F401

    import qcompile
    from qcompile.tools import zoo

    baseline = _settle()
    tokens, window = spec["calibration_tokens"], spec["window"]
    if spec["tiny"]:
        model = _tiny_llama()
        gen = torch.Generator().manual_seed(1)
        windows = list(torch.randint(0, 256, (1, tokens), generator=gen).split(window, dim=1))
    else:
        model, tokenizer = zoo.load_smollm2()
        windows = zoo.token_windows(tokenizer, "emma", tokens, window)
    calibration = [{"input_ids": ids, "use_cache": False} for ids in windows]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once

    loaded = _settle()
    resettable = _peak_rss_reset()
    with torch.no_grad():
        model(**calibration[0])
    activations = _peak_rss_bytes() - loaded

    _settle()
    _peak_rss_reset()
    qmodel = qcompile.quantize(model, calibration, recipe=spec["recipe"], lower=spec["lower"], progress=False)
    peak = _peak_rss_bytes() - baseline
    return {"baseline": baseline, "loaded": loaded - baseline, "model_bytes": model_bytes,
            "activations": activations, "peak": peak, "after": _settle() - baseline, "seconds": qmodel.seconds,
            "peak_reset": resettable, "batches": len(calibration),
            "tokens": sum(b["input_ids"].numel() for b in calibration), "threads": torch.get_num_threads()}


def bench_memory(recipe: str, calibration_tokens: int, window: int, lower: str, tiny: bool) -> str:
    """Run `memory_row` in a fresh process (its own baseline and peak) and print its table."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    spec = {"recipe": recipe, "calibration_tokens": calibration_tokens, "window": window, "lower": lower, "tiny": tiny}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        subprocess.run([sys.executable, "-m", "qcompile.tools.bench", "memory-row", json.dumps(spec), out], check=True)
        with open(out) as f:
            r = json.load(f)
    mib = 2**20
    target = 2 * r["model_bytes"] + r["activations"]
    row = [recipe, r["model_bytes"] / mib, r["activations"] / mib, r["peak"] / mib, target / mib,
           r["peak"] / target, r["seconds"]]
    name = "tiny random Llama" if tiny else "SmolLM2-135M"
    title = (f"{name} {recipe}, calibration {r['tokens']} tokens {'(random)' if tiny else 'of Emma'} in "
             f"{r['batches']} batches, lower={lower}, {r['threads']} CPU threads, a fresh process: baseline "
             f"(after imports) {r['baseline'] / mib:.0f} MiB; model loaded {r['loaded'] / mib:.0f} MiB above it; "
             f"after quantize {r['after'] / mib:.0f} MiB above it"
             + ("" if r["peak_reset"] else "; peaks are the whole process's (no /proc/self/clear_refs)"))
    table = tabulate([row], headers=["recipe", "model MiB (M)", "one batch's activations MiB (A)",
                                     "quantize peak above baseline MiB", "target 2M + A MiB", "peak / target",
                                     "quantize s"], floatfmt=("", ".1f", ".1f", ".1f", ".1f", ".2f", ".1f"))
    return title + "\n" + table


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
    decode = sub.add_parser("decode", help="greedy generate: decode tokens/s, TTFT, weight bytes, peak memory "
                                           "of FP32, torchao and q4 recipes")
    decode.add_argument("--prompt-tokens", type=int, default=64)
    decode.add_argument("--new-tokens", type=int, default=128, help="tokens generated (min = max)")
    decode.add_argument("--batch", type=_ints, default=[1, 4], help="batch sizes (comma list, default 1,4)")
    decode.add_argument("--recipes", default="w4a4,w4a8,w4a16", help="q4 recipes (comma list)")
    decode.add_argument("--repeats", type=int, default=3)
    decode.add_argument("--calibration-batches", type=int, default=2, help="512-token windows of Emma for q4")
    decode.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama instead of SmolLM2")
    row = sub.add_parser("decode-row", help="(internal) one row of `bench decode`, in a fresh process")
    row.add_argument("spec", help="the row as JSON")
    row.add_argument("out", help="where to write the result as JSON")
    artifact = sub.add_parser("artifact", help="SmolLM2: quantize time against loading the saved artifact in a new process")
    artifact.add_argument("--recipe", default="w4a4")
    artifact.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of Emma (512-token batches)")
    artifact.add_argument("--prompt-tokens", type=int, default=256, help="tokens of the first call")
    artifact.add_argument("--dir", default="q4-artifact-bench", help="where to save the artifact")
    artifact.add_argument("--no-compiling-load", action="store_true",
                          help="skip the load that compiles its kernels itself (the slow row)")
    memory = sub.add_parser("memory", help="peak memory of qcompile.quantize against the FP32 model's size")
    memory.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES))
    memory.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of Emma to calibrate on")
    memory.add_argument("--window", type=int, default=512, help="tokens per calibration batch")
    memory.add_argument("--lower", default="eager", choices=("eager", "inductor"),
                        help="lowering of the first call (default eager: the peak of quantizing, not of compiling)")
    memory.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama instead of SmolLM2")
    memory_internal = sub.add_parser("memory-row", help="(internal) the fresh process of `bench memory`")
    memory_internal.add_argument("spec", help="the run as JSON")
    memory_internal.add_argument("out", help="where to write the result as JSON")
    internal = sub.add_parser("load-artifact", help="(internal) the fresh process of `bench artifact`")
    internal.add_argument("directory")
    internal.add_argument("work")
    internal.add_argument("prompt")
    internal.add_argument("--trust-compiled", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "memory":
        if args.calibration_tokens < 1 or args.window < 1:
            parser.error("--calibration-tokens and --window must be positive")
        print(bench_memory(args.recipe, args.calibration_tokens, args.window, args.lower, args.tiny))
    elif args.command == "memory-row":
        import json

        result = memory_row(json.loads(args.spec))
        with open(args.out, "w") as f:
            json.dump(result, f)
    elif args.command == "artifact":
        print(bench_artifact(args.recipe, args.calibration_tokens, args.prompt_tokens, args.dir,
                             not args.no_compiling_load))
    elif args.command == "load-artifact":
        load_artifact(args.directory, args.work, args.prompt, args.trust_compiled)
    elif args.command == "decode":
        recipes = [r for r in args.recipes.split(",") if r]
        unknown = [r for r in recipes if r not in RECIPES]
        if unknown:
            parser.error(f"unknown recipes {unknown}; known recipes: {', '.join(RECIPES)}")
        if min([args.prompt_tokens, args.new_tokens - 1, args.repeats, args.calibration_batches, *args.batch]) < 1:
            parser.error("--prompt-tokens, --batch, --repeats, --calibration-batches must be positive and "
                         "--new-tokens at least 2 (decode speed counts the tokens after the first)")
        print(bench_decode(args.prompt_tokens, args.new_tokens, args.batch, recipes, args.repeats,
                           args.calibration_batches, args.tiny))
    elif args.command == "decode-row":
        import json

        result = decode_row(json.loads(args.spec))
        with open(args.out, "w") as f:
            json.dump(result, f)
    elif args.command == "kernels":
        where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"q4 linear vs {'FP16 cuBLAS' if args.device == 'cuda' else 'FP32'} on {where}, torch {torch.__version__}, "
              f"median of {args.repeats} side-by-side repetitions")
        print(bench_kernels(args.shapes, args.m, args.repeats, args.device))
    else:
        print(bench_prefill(args.tokens, [r for r in args.recipes.split(",") if r], args.repeats, args.tiny))


if __name__ == "__main__":
    main()
