"""SmolLM2-135M through the Triton GEMM (Triton's interpreter on CPU, the compiled kernel on a GPU)
gives the logits the CPU integer path gives: the kernels hold up on a real model's operands
(576 / 1536-wide layers, the 49152-wide W4A8 head), not only on random test shapes.

The quantized model is the w4a4 one `qcompile bench artifact` saved (the session's
`smollm2_artifact`: 128 calibration tokens of Emma), compiled from that artifact with
`torch.compile(..., backend="q4", options={"artifact": ...})`: the same graph and weights as
calibrating here, without running GPTQ over the 211 linears a second time."""

from __future__ import annotations

import time

import pytest
import torch

from qcompile.backends import lowering
from qcompile.backends import q4 as q4_backend
from qcompile.kernels import triton_gemm
from qcompile.tools import zoo


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
    gemm = triton_gemm.linear_w4a4
    monkeypatch.setattr(triton_gemm, "linear_w4a4",
                        lambda *args, **kwargs: calls.append(args[0].shape) or gemm(*args, **kwargs))
    monkeypatch.setattr(artifact, "_run", lowering.use_triton_kernels(artifact.graph_module))
    monkeypatch.setattr(artifact, "_monitor", None)  # that graph module has no range-check output
    start = time.perf_counter()
    with torch.no_grad():
        triton_logits = compiled(input_ids=prompt, use_cache=False).logits
    print(f"SmolLM2 forward of {prompt.shape[1]} tokens through the Triton GEMM: {time.perf_counter() - start:.1f} s")
    assert len(calls) == fused
    # the same integer products and the same epilogue: equal up to float32 reduction order elsewhere
    torch.testing.assert_close(triton_logits, cpu_logits, rtol=0, atol=1e-5 * cpu_logits.abs().max().item())
    assert torch.equal(triton_logits.argmax(-1), cpu_logits.argmax(-1))
