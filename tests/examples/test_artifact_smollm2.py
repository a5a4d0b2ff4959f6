"""SmolLM2-135M: quantize with the default recipe, save, load in NEW processes: the loaded
model's logits equal the quantized model's bit for bit, and the loading process calibrates
nothing. This is `qcompile bench artifact` on a short input (the benchmark behind the
"load < 25% of quantize time" figure), run as a user runs it; every process starts with an
empty Inductor cache of its own. The run is the module's `smollm2_artifact`,
whose saved artifact the Triton test compiles from. The artifact holds the constants the
pipeline computed, which a load checks and puts back: what keeps it bit-exact on another
machine (tests/qcompile/test_artifact.py perturbs a tiny model's replay to prove it).

The Triton test compiles SmolLM2 from the same artifact (one module: under pytest-xdist its tests
share a worker, so the artifact is made once): through the Triton GEMM (Triton's interpreter on
CPU, the compiled kernel on a GPU) it gives the logits the CPU integer path gives, so the kernels
hold up on a real model's operands (576 / 1536-wide layers, the 49152-wide W4A8 head), not only on
random test shapes; without running GPTQ over the 211 linears a second time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qcompile.backends import lowering
from qcompile.backends import q4 as q4_backend
from qcompile.frontend import saved_artifact
from qcompile.kernels import triton_tiled_gemm
from qcompile.tools import zoo
from tests.helpers.recipes import quick

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`qcompile bench artifact` on a short input, run once as a user runs it: SmolLM2 quantized
    with w4a4 on 128 calibration tokens of Emma (one batch), saved, loaded in a new process. The
    benchmark's test reads its table; the Triton test compiles from the saved artifact, so GPTQ
    runs once for both. Its rotations are learned in a few steps (`Q4_PIPELINE`: the same passes,
    learned factors and kernels, tests/helpers/recipes.py). (process, the artifact's directory)"""
    directory = tmp_path_factory.mktemp("smollm2-w4a4") / "artifact"
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "bench", "artifact", "--calibration-tokens", "128",
         "--prompt-tokens", "24", "--no-compiling-load", "--dir", str(directory)],
        capture_output=True, text=True, timeout=1500, cwd=ROOT, env={**os.environ, "Q4_PIPELINE": quick("w4a4")})
    return proc, directory


@pytest.mark.model
def test_bench_artifact_loads_in_a_new_process_bit_exactly(smollm2_artifact):
    proc, directory = smollm2_artifact
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.startswith("SmolLM2-135M w4a4, calibration 128 tokens")
    loads = [line for line in out.splitlines() if line.startswith("load, new process")]
    assert [line.split(",")[2].split("  ")[0].strip() for line in loads] == [
        "trust_compiled=True (the artifact's compiled kernels)"]
    for line in loads:
        cells = line.split()
        assert cells[-2:] == ["yes", "none"], line  # logits bit-exact; no calibration
    assert (directory / "q4.safetensors").is_file()
    # what makes the load bit-exact on another machine: every quantized linear's packed weight,
    # steps and group multipliers, by name (the packed weight stored once: it is GPTQ's result)
    saved = saved_artifact.read(directory)
    assert saved.manifest["format_version"] == saved_artifact.FORMAT_VERSION
    constants, memo = saved.manifest["constants"], saved.manifest["memo"]
    for role in ("packed", "step", "mult"):
        assert sum(name.endswith(f"_weight_{role}") for name in constants) == 30 * 7 + 1, role
    gptq = {e["result"][0] for key, entries in memo.items() if key.startswith("gptq/") for e in entries}
    assert all(digest in gptq for name, digests in constants.items() if name.endswith("_packed") for digest in digests)


@pytest.mark.model
def test_smollm2_logits_through_the_triton_gemm_match_the_cpu_path(monkeypatch, smollm2, smollm2_artifact):
    proc, directory = smollm2_artifact
    assert proc.returncode == 0, proc.stderr[-4000:]
    model, tokenizer = smollm2
    prompt = zoo.token_windows(tokenizer, "pride_and_prejudice", 6, 6)[0]
    compiled = torch.compile(model, backend="q4", options={
        "recipe": "w4a4", "lower": "eager", "progress": False, "artifact": str(directory)})
    with torch.no_grad():
        cpu_logits = compiled(input_ids=prompt, use_cache=False).logits
    artifact = q4_backend.compiled_graphs()[-1]
    fused = artifact.count_ops(torch.ops.q4.linear_w4a4.default)
    assert fused == 30 * 7 + 1  # every decoder linear and the head

    calls = []
    gemm = triton_tiled_gemm.linear_w4a4_tiled  # every SmolLM2 linear: K = 576 or 1536, multiples of 64
    monkeypatch.setattr(triton_tiled_gemm, "linear_w4a4_tiled",
                        lambda *args, **kwargs: calls.append(args[0].shape) or gemm(*args, **kwargs))
    monkeypatch.setattr(artifact, "_run", lowering.use_triton_kernels(artifact.graph_module, everywhere=True))
    monkeypatch.setattr(artifact, "_monitor", None)  # that graph module has no range-check output
    start = time.perf_counter()
    with torch.no_grad():
        triton_logits = compiled(input_ids=prompt, use_cache=False).logits
    print(f"SmolLM2 forward of {prompt.shape[1]} tokens through the Triton GEMM: {time.perf_counter() - start:.1f} s")
    assert len(calls) == fused
    # the same integer products and the same epilogue: equal up to float32 reduction order elsewhere
    torch.testing.assert_close(triton_logits, cpu_logits, rtol=0, atol=1e-5 * cpu_logits.abs().max().item())
    assert torch.equal(triton_logits.argmax(-1), cpu_logits.argmax(-1))
