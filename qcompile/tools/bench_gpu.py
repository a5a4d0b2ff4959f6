"""One table of q4 against FP16 and torchao on a GPU: the GEMMs and a Llama-2-7B model end to end.

    qcompile bench-gpu [--model llama2-7b|tiny] [--shapes 4096x4096,...] [--m 1,16,2048]
        [--batches 1,16] [--layers N] [--prefill-tokens 2048] [--context 128] [--decode-steps 32] [--recipe w4a4-rtn]
        [--repeats 3] [--bandwidth-gbs B --fp16-tflops F --int8-tops I]

Rows (one table, measured in one run):
  GEMM KxN M=m    one linear at Llama-2-7B's shapes: FP16 `torch.matmul` (cuBLAS) against torchao's
                  int4 weight-only linear (bf16, group 128) and q4's W4A4 GEMM (int8 codes in,
                  FP16 out: the tuned kernel over the tiled layout where K is a multiple of 64, as
                  the lowering runs it; the activation quantize is fused into the kernel before it
                  in a compiled model, so it is not timed here). Time per call, µs.
  decode batch b  a Llama-2-7B-config model with random fp16 weights (quantizing needs no
                  trained weights to be timed): `torch.compile(mode="max-autotune")` (Inductor, CUDA
                  graphs) of the FP16 model, of torchao's int4 weight-only model, and with
                  `backend="q4"` (the recipe, calibrated on random tokens) with the same mode;
                  a static KV cache filled with a `context`-token prompt, then `decode-steps` single-
                  token steps timed: tokens/s = batch x steps / time.
  prefill T       one forward of T tokens (no cache), ms.
  peak GPU memory the allocator's peak over the timed runs of that variant (its own process); for
                  q4 it includes the float model the compiled graphs were made from, which the
                  user's model still holds.
  linear weights  the linears' weight bytes as each variant holds them (q4: packed int4 + steps).

Columns: each variant's value, q4's speedup against FP16 and torchao (time ratio, or throughput
ratio; for memory how many times less), and the roofline: the time the device's limits allow for
that work (bytes at the memory bandwidth, or operations at the tensor-core rate: INT8 for q4's
GEMMs, FP16 otherwise; the larger) as a fraction of the measured time, for FP16 / torchao / q4.
A decode step's bytes are its linear weights plus the KV cache it reads; prefill's operations are
2 x T x the linear parameters plus causal attention's 2 x T^2 x hidden x layers. Device limits
are the vendor's dense datasheet numbers for the GPUs listed in DEVICE_LIMITS (or the flags).

Each end-to-end variant runs in a fresh process (its own peak memory and compile caches), one
after another. `--model tiny` (a tiny random Llama) with TRITON_INTERPRET=1 runs the whole
command on CPU in float32, q4's GEMMs in Triton's interpreter: how the tests check it; its times
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from collections.abc import Callable

import torch
from tabulate import tabulate

from qcompile.core.recipes import RECIPES
from qcompile.tools.bench import (
    LLAMA2_7B_SHAPES,
    _ints,
    _linear_weight_bytes,
    _peak_rss_bytes,
    _peak_rss_reset,
    _q4_weight_bytes,
    _shapes,
    fresh_process_row,
)

LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
TINY = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

# name substring (first match) -> (memory bytes/s, dense FP16 FLOP/s, dense INT8 OP/s): datasheets
DEVICE_LIMITS = [
    ("H200", (4.8e12, 989e12, 1979e12)),
    ("H100 PCIe", (2.0e12, 756e12, 1513e12)),
    ("H100 NVL", (3.9e12, 835e12, 1671e12)),
    ("H100", (3.35e12, 989e12, 1979e12)),  # SXM5, HBM3
    ("A100", (2.0e12, 312e12, 624e12)),  # 80 GB SXM
]
VARIANTS = ("float", "torchao int4 weight-only", "q4")


def device_limits(name: str) -> tuple[float, float, float] | None:
    return next((limits for key, limits in DEVICE_LIMITS if key in name), None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median seconds of a call after a warm-up; on CUDA Triton's do_bench (L2 flushed between
    calls: a decode-time GEMM reads its weight from memory)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- GEMM rows -----------------------------------------------------------------------------------


def _torchao_int4_config():
    """torchao's int4 weight-only config, group 128, on its tinygemm kernel where the version
    names packing formats (its default format there needs fbgemm-gpu-genai)."""
    from torchao.quantization import Int4WeightOnlyConfig

    try:
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    except TypeError:  # an older torchao: one format, tinygemm's
        return Int4WeightOnlyConfig(group_size=128)


def _torchao_int4_linear(k: int, n: int, x16: torch.Tensor) -> tuple[Callable[[], object] | None, str]:
    if x16.device.type != "cuda":
        return None, "CUDA only"
    try:
        from torchao.quantization import quantize_

        layer = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        quantize_(layer, _torchao_int4_config())
        x = x16.to(torch.bfloat16)
        return (lambda: layer(x)), ""
    except ModuleNotFoundError:
        return None, "not installed"
    except Exception as e:  # noqa: BLE001 - optional peer: the row says why it is missing
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"


def _q4_gemm(x_codes: torch.Tensor, packed: torch.Tensor, tiled: torch.Tensor | None, w_step: torch.Tensor,
             a_step: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """q4's W4A4 GEMM as the lowering runs it: the tuned kernel over the tiled layout, or the
    general kernel where the layout does not cover K."""
    from qcompile.kernels import triton_gemm, triton_tiled_gemm

    if tiled is not None:
        return lambda: triton_tiled_gemm.linear_w4a4_tiled(x_codes, tiled, w_step, a_step, None, dtype,
                                                           check_values=False)  # as the compiled model calls it
    return lambda: triton_gemm.linear_w4a4(x_codes, packed, w_step, a_step, None, dtype, check_values=False)


def gemm_rows(shapes: list[tuple[int, int]], m_values: list[int], device: str, dtype: torch.dtype,
              repeats: int) -> list[dict]:
    """Per (K, N, M): seconds of the float matmul, torchao's int4 linear and q4's W4A4 GEMM, and
    the bytes and operations each moves and does (for the roofline)."""
    from qcompile.kernels import gpu_layout, int4

    rows = []
    for k, n in shapes:
        codes, w_step = int4.quantize_weight_per_channel(torch.randn(n, k))
        packed, w_step = int4.pack_int4(codes).to(device), w_step.to(device)
        tiled = gpu_layout.to_tiled(packed, k) if gpu_layout.covers(k) else None
        w = torch.randn(n, k, device=device, dtype=dtype)
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=dtype)
            x_codes = torch.randint(-8, 8, (m, k), device=device, dtype=torch.int8)
            a_step = torch.tensor(0.01, device=device)
            q4 = _q4_gemm(x_codes, packed, tiled, w_step, a_step, dtype)
            ao, why = _torchao_int4_linear(k, n, x)
            out_bytes = m * n * torch.finfo(dtype).bits // 8
            ops = 2 * m * n * k
            rows.append({
                "label": f"GEMM {k}x{n} M={m} µs", "unit": 1e6, "higher_is_better": False,
                "float": _seconds(lambda x=x, w=w: torch.matmul(x, w.t()), repeats, device),
                "torchao int4 weight-only": _seconds(ao, repeats, device) if ao else None, "torchao_why": why,
                "q4": _seconds(q4, repeats, device),
                "bytes": {"float": (m * k + n * k) * x.element_size() + out_bytes,
                          "torchao int4 weight-only": m * k * 2 + n * k // 2 + n * (k // 128) * 4 + out_bytes,
                          "q4": m * k + n * k // 2 + n * 4 + out_bytes},
                "ops": {v: ops for v in VARIANTS}, "int8": {"q4"}})
    return rows


# --- the model, one variant a process ------------------------------------------------------------


def _model(spec: dict) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    with torch.device(spec["device"]):
        model = LlamaForCausalLM._from_config(LlamaConfig(**spec["config"]), dtype=dtype)
    return model.eval()


def _prepare(variant: str, model: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """Make `model` the variant, compiled (in place: each variant has its own process)."""
    mode = spec["mode"]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if variant == "float":
        model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
    elif variant == "torchao int4 weight-only":
        from torchao.quantization import quantize_

        model.to(torch.bfloat16)  # torchao's int4 CUDA kernels take bfloat16
        quantize_(model, _torchao_int4_config())
        model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
    else:
        gen = torch.Generator().manual_seed(1)
        vocab = spec["config"]["vocab_size"]
        calibration = [{"input_ids": torch.randint(0, vocab, (1, spec["calibration_tokens"]), generator=gen)
                        .to(spec["device"])}]
        options = {"recipe": spec["recipe"], "calibration": calibration, "progress": False}
        if spec["device"] == "cpu":
            options["kernels"] = "triton"  # the Triton GEMMs, in the interpreter
        options["mode"] = mode or "default"  # torch.compile takes mode or options, not both
        model.forward = torch.compile(model.forward, backend="q4", dynamic=False, options=options)
    return model


def _decode_seconds(model: torch.nn.Module, batch: int, spec: dict) -> float:
    """Seconds of `decode_steps` single-token greedy steps after a `context`-token prompt, through
    a static KV cache (each step's token read back from the last step's logits on the device)."""
    from transformers import StaticCache

    device, context, steps = spec["device"], spec["context"], spec["decode_steps"]
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, spec["config"]["vocab_size"], (batch, context), generator=gen).to(device)
    cache = StaticCache(config=model.config, max_cache_len=context + steps)
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(context, device=device)).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True,
                           cache_position=torch.tensor([context + i], device=device)).logits
            token = logits[:, -1:].argmax(-1)
        _sync(device)
    return time.perf_counter() - start


def _prefill_seconds(model: torch.nn.Module, spec: dict) -> float:
    device = spec["device"]
    ids = torch.randint(0, spec["config"]["vocab_size"], (1, spec["prefill_tokens"]),
                        generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
    return time.perf_counter() - start


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _peak_rss_reset()


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()


def model_row(spec: dict) -> dict:
    """One variant's end-to-end numbers, in this (fresh) process; an error becomes the row's `error`."""
    variant = spec["variant"]
    result: dict = {"variant": variant}
    try:
        model = _prepare(variant, _model(spec), spec)
        _prefill_seconds(model, spec)  # warm-up: compiles (q4: quantizes) at these shapes
        for batch in spec["batches"]:
            _decode_seconds(model, batch, spec)
        _reset_peak(spec["device"])
        result["prefill"] = statistics.median(_prefill_seconds(model, spec) for _ in range(spec["repeats"]))
        result["decode"] = {str(b): statistics.median(_decode_seconds(model, b, spec) for _ in range(spec["repeats"]))
                            for b in spec["batches"]}
        result["peak"] = _peak(spec["device"])
        if variant == "q4":
            from qcompile.backends import q4 as q4_backend

            result["weight_bytes"] = _q4_weight_bytes(q4_backend.compiled_graphs())
        else:
            result["weight_bytes"] = _linear_weight_bytes(model)
    except ModuleNotFoundError as e:
        result["error"] = f"{e.name} not installed"
    except Exception as e:  # noqa: BLE001 - the row says why it has no numbers
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:70] if str(e) else ''}"
    return result


def _run_model_row(spec: dict) -> dict:
    """`model_row` in a fresh Python process."""
    return fresh_process_row("qcompile.tools.bench_gpu", "model-row", spec, {"variant": spec["variant"]})


def _model_work(config: dict, spec: dict, weight_bytes: int, batch: int | None) -> tuple[int, int]:
    """(bytes, operations) of a decode step at `batch` (None: the prefill) for the roofline."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    kv_row = 2 * layers * config["num_key_value_heads"] * head_dim * 2  # fp16 keys and values, bytes a token
    linear_params = layers * (2 * h * h + 2 * h * config["num_key_value_heads"] * head_dim
                              + 3 * h * config["intermediate_size"]) + h * config["vocab_size"]
    if batch is None:
        t = spec["prefill_tokens"]
        return weight_bytes + t * kv_row, 2 * t * linear_params + 2 * t * t * h * layers
    mean_context = spec["context"] + spec["decode_steps"] // 2
    return weight_bytes + batch * mean_context * kv_row, batch * (2 * linear_params + 4 * mean_context * h * layers)


def model_rows(spec: dict) -> list[dict]:
    results = {}
    for variant in VARIANTS:
        print(f"bench gpu: {variant} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[variant] = _run_model_row({**spec, "variant": variant})
        print(f"bench gpu: {variant} done in {time.perf_counter() - start:.0f} s"
              + (f" ({results[variant]['error']})" if "error" in results[variant] else ""), file=sys.stderr, flush=True)

    def value(variant: str, get: Callable[[dict], float]) -> float | None:
        return None if "error" in results[variant] else get(results[variant])

    def work(batch: int | None) -> tuple[dict, dict]:
        sizes = {v: _model_work(spec["config"], spec, results[v]["weight_bytes"], batch)
                 for v in VARIANTS if "error" not in results[v]}
        return {v: s[0] for v, s in sizes.items()}, {v: s[1] for v, s in sizes.items()}

    errors = {v: results[v]["error"] for v in VARIANTS if "error" in results[v]}
    rows = []
    for batch in spec["batches"]:
        bytes_, ops = work(batch)
        rows.append({"label": f"decode batch {batch} tok/s", "unit": 1.0, "higher_is_better": True,
                     **{v: value(v, lambda r, b=batch: spec["decode_steps"] * b / r["decode"][str(b)])
                        for v in VARIANTS},
                     "seconds": {v: value(v, lambda r, b=batch: r["decode"][str(b)] / spec["decode_steps"])
                                 for v in VARIANTS},
                     "bytes": bytes_, "ops": ops, "int8": {"q4"}, "errors": errors})
    bytes_, ops = work(None)
    rows.append({"label": f"prefill {spec['prefill_tokens']} tokens ms", "unit": 1e3, "higher_is_better": False,
                 **{v: value(v, lambda r: r["prefill"]) for v in VARIANTS}, "bytes": bytes_, "ops": ops,
                 "int8": {"q4"}, "errors": errors})
    peak = "peak GPU memory GiB" if spec["device"] == "cuda" else "peak RSS GiB"
    for label, key in ((peak, "peak"), ("linear weights GiB", "weight_bytes")):
        rows.append({"label": label, "unit": 2.0**-30, "higher_is_better": False,
                     **{v: value(v, lambda r, k=key: r[k]) for v in VARIANTS}, "errors": errors})
    return rows


# --- the table -----------------------------------------------------------------------------------


def _ratio(row: dict, other: str) -> str:
    q4, base = row.get("q4"), row.get(other)
    if not q4 or not base:
        return ""
    return f"{(q4 / base if row['higher_is_better'] else base / q4):.3g}x"


def _roofline(row: dict, limits: tuple[float, float, float] | None) -> str:
    """time at the device's limits / measured time, per variant."""
    if limits is None or "bytes" not in row:
        return ""
    bandwidth, fp16, int8 = limits
    cells = []
    for v in VARIANTS:
        seconds = row.get("seconds", {}).get(v) if "seconds" in row else row.get(v)
        if not seconds or v not in row["bytes"]:
            cells.append("-")
            continue
        ideal = max(row["bytes"][v] / bandwidth, row["ops"][v] / (int8 if v in row["int8"] else fp16))
        cells.append(f"{100 * ideal / seconds:.0f}%")
    return " / ".join(cells)


def table(rows: list[dict], float_name: str, recipe: str, limits: tuple[float, float, float] | None) -> str:
    headers = ["measurement", float_name, "torchao int4 weight-only", f"q4 {recipe}", "q4 vs " + float_name,
               "q4 vs torchao", f"roofline {float_name} / torchao / q4"]
    body = []
    for row in rows:
        cells = []
        for v in VARIANTS:
            x = row.get(v)
            why = row.get("errors", {}).get(v) or (row.get("torchao_why") if v != "q4" and v != "float" else "")
            cells.append(f"{x * row['unit']:.4g}" if x else (why or "-"))
        body.append([row["label"], *cells, _ratio(row, "float"), _ratio(row, "torchao int4 weight-only"),
                     _roofline(row, limits)])
    return tabulate(body, headers=headers, disable_numparse=True)


def run(args: argparse.Namespace) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    float_name = {torch.float16: "FP16", torch.float32: "FP32"}[dtype]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    limits = device_limits(name) if device == "cuda" else None
    if args.bandwidth_gbs and args.fp16_tflops and args.int8_tops:
        limits = (args.bandwidth_gbs * 1e9, args.fp16_tflops * 1e12, args.int8_tops * 1e12)
    spec = {"device": device, "dtype": str(dtype).removeprefix("torch."), "recipe": args.recipe,
            "config": {**(LLAMA2_7B if args.model == "llama2-7b" else TINY),
                       **({"num_hidden_layers": args.layers} if args.layers else {})}, "batches": args.batches,
            "prefill_tokens": args.prefill_tokens, "context": args.context, "decode_steps": args.decode_steps,
            "repeats": args.repeats, "calibration_tokens": args.calibration_tokens,
            "mode": "max-autotune" if device == "cuda" else None}
    rows = gemm_rows(args.shapes, args.m, device, dtype, args.repeats) + model_rows(spec)
    title = (f"q4 on {name}, torch {torch.__version__}: GEMMs at {len(args.shapes)} shapes, then a "
             f"{'Llama-2-7B' if args.model == 'llama2-7b' else 'tiny'}-config Llama "
             f"(decoder layers: {spec['config']['num_hidden_layers']}) with random {float_name} weights "
             f"(mode={spec['mode']!r}{', CUDA graphs' if device == 'cuda' else ''}), each variant in its own process; "
             f"decode: {args.context}-token prompt, {args.decode_steps} steps timed; median of {args.repeats}")
    notes = ("q4 vs X: speedup (time or tokens/s ratio; memory: times less). roofline: the time the device's "
             "limits allow for the row's work (bytes at the memory bandwidth or operations at the FP16 / INT8 "
             "tensor-core rate, the larger) over the measured time"
             + ("" if limits else "; no limits known for this device (--bandwidth-gbs, --fp16-tflops, --int8-tops)"))
    return title + "\n" + table(rows, float_name, args.recipe, limits) + "\n" + textwrap.fill(notes, 120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qcompile bench-gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    row = sub.add_parser("model-row", help="(internal) one variant's end-to-end numbers, in a fresh process")
    row.add_argument("spec")
    row.add_argument("out")
    parser.add_argument("--model", choices=("llama2-7b", "tiny"), default="llama2-7b")
    parser.add_argument("--shapes", type=_shapes, default=list(LLAMA2_7B_SHAPES), help="GEMM KxN pairs")
    parser.add_argument("--m", type=_ints, default=[1, 16, 2048], help="GEMM rows (default 1,16,2048)")
    parser.add_argument("--batches", type=_ints, default=[1, 16], help="decode batch sizes (default 1,16)")
    parser.add_argument("--layers", type=int, help="decoder layers of the model (default: the config's, 32 for "
                        "Llama-2-7B); fewer compile faster, and per-layer ratios hold")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before the timed decode steps")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--calibration-tokens", type=int, default=128, help="random tokens q4 calibrates on")
    parser.add_argument("--recipe", default="w4a4-rtn", choices=list(RECIPES),
                        help="q4's recipe (default w4a4-rtn: speed does not depend on how the weights were rounded)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, help="the device's memory bandwidth, GB/s (roofline)")
    parser.add_argument("--fp16-tflops", type=float, help="its dense FP16 tensor-core rate, TFLOP/s")
    parser.add_argument("--int8-tops", type=float, help="its dense INT8 tensor-core rate, TOP/s")
    args = parser.parse_args(argv)
    if args.command == "model-row":
        result = model_row(json.loads(args.spec))
        with open(args.out, "w") as f:
            json.dump(result, f)
        return
    if min([args.prefill_tokens, args.context, args.decode_steps, args.repeats, args.calibration_tokens,
            *args.m, *args.batches, 1 if args.layers is None else args.layers]) < 1:
        parser.error("--m, --batches, --layers, --prefill-tokens, --context, --decode-steps, --repeats and "
                     "--calibration-tokens must be positive")
    print(run(args))


if __name__ == "__main__":
    main()
