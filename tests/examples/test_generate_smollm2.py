"""Text generation with the real SmolLM2-135M compiled by q4: generate() through the KV cache
computes what the compiled model computes without it, compiles a bounded number of graphs,
calibrates once, and treats a left-padded batch row by row.

Greedy decoding is checked against the compiled model's own no-cache logits: at every step the
token generated through the cache is the argmax of the no-cache logits at that position.
"""

from __future__ import annotations

import math

import pytest
import torch

import qcompile
from qcompile.backends.generation import forward_replaced
from qcompile.backends.q4 import Q4Backend
from qcompile.frontend import calibrate
from qcompile.tools import zoo

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def calibration(smollm2):
    _, tokenizer = smollm2
    return [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 512, 512)]


def _prompts(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    windows = zoo.token_windows(tokenizer, "pride_and_prejudice", count * 200, 200)
    return [w[:, :length] for w in windows[:count]]


def _compiled_forward(model, recipe: str, calibration: list, graphs: list | None = None):
    """The documented form, `model.forward = torch.compile(model.forward, backend=...)`, with the
    q4 backend as an object that adds each graph it compiles to `graphs`."""
    graphs = graphs if graphs is not None else []
    backend = Q4Backend({"recipe": recipe, "calibration": calibration, "progress": False},
                        on_compiled=lambda graph, _inputs: graphs.append(graph))
    return torch.compile(model.forward, backend=backend)


def _greedy(model, prompt: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, **kwargs)


def _assert_follows_no_cache_argmax(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, use_cache=False).logits
    n = prompt.shape[1]
    assert torch.equal(logits[:, n - 1 : -1].argmax(-1), tokens[:, n:])
    return logits


@pytest.mark.parametrize("recipe", ["w4a4", "w4a8", "w4a16"])
def test_generation_through_the_cache_follows_the_no_cache_logits(smollm2, calibration, recipe):
    model, tokenizer = smollm2
    prompts = _prompts(tokenizer, 4 if recipe == "w4a4" else 1, 24)
    new = 64 if recipe == "w4a4" else 16
    graphs: list = []
    with torch.no_grad(), forward_replaced(model, _compiled_forward(model, recipe, calibration, graphs)):
        for prompt in prompts:
            dynamic = _greedy(model, prompt, new)
            logits = _assert_follows_no_cache_argmax(model, prompt, dynamic)
        static = _greedy(model, prompts[-1], new, cache_implementation="static")
        _assert_follows_no_cache_argmax(model, prompts[-1], static)
    fused = torch.ops.q4.linear_w4a16 if recipe == "w4a16" else torch.ops.q4.linear_w4a4
    assert graphs and all(g.count_ops(fused) > 0 for g in graphs)
    with torch.no_grad():
        float_logits = model(dynamic, use_cache=False).logits
    assert not torch.allclose(logits, float_logits, atol=1e-2)  # quantized, not the float model


def test_perplexity_through_the_cache_equals_the_no_cache_perplexity(smollm2, calibration):
    model, tokenizer = smollm2
    ids = zoo.token_windows(tokenizer, "pride_and_prejudice", 2048, 2048)[0]
    with torch.no_grad(), forward_replaced(model, _compiled_forward(model, "w4a4", calibration)):
        no_cache = model(ids, use_cache=False).logits[0, :-1]
        out = model(ids[:, :1])
        steps = [out.logits[0, -1]]
        for t in range(1, ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits[0, -1])
    targets = ids[0, 1:]
    nll = lambda logits: torch.nn.functional.cross_entropy(logits.float(), targets).item()  # noqa: E731
    cached, plain = math.exp(nll(torch.stack(steps))), math.exp(nll(no_cache))
    assert abs(cached / plain - 1) < 0.005, (cached, plain)


def test_compiles_are_bounded_and_calibration_runs_once(smollm2, calibration, monkeypatch):
    """A 256-token generation and prompts of 8 to 512 tokens: a handful of graphs (the prompt,
    the first decode step, the decode steps after it, dynamic prompt lengths), not one a token,
    and the model is calibrated once."""
    model, tokenizer = smollm2
    calibrations = []
    observe_model = calibrate.observe_model
    monkeypatch.setattr(calibrate, "observe_model", lambda *a, **k: calibrations.append(1) or observe_model(*a, **k))
    graphs: list = []
    ids = zoo.token_windows(tokenizer, "pride_and_prejudice", 512, 512)[0]
    with torch.no_grad(), forward_replaced(model, _compiled_forward(model, "w4a4", calibration, graphs)):
        _greedy(model, ids[:, :8], 256)
        after_first = len(graphs)
        for length in (37, 130, 512):
            _greedy(model, ids[:, :length], 8)
    assert after_first <= 3, after_first
    assert len(graphs) <= 5, len(graphs)
    assert len(calibrations) == 1


def test_a_left_padded_batch_generates_each_row_as_alone(smollm2, calibration):
    model, tokenizer = smollm2
    texts = ["It is a truth universally acknowledged that", "Emma Woodhouse, handsome, clever, and rich,"
             " with a comfortable home and happy disposition,"]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad(), forward_replaced(model, _compiled_forward(model, "w4a4", calibration)):
        together = _greedy(model, batch.input_ids, 16, attention_mask=batch.attention_mask)[:, -16:]
        for row, text in enumerate(texts):
            alone = _greedy(model, tokenizer(text, return_tensors="pt").input_ids, 16)[:, -16:]
            assert torch.equal(together[row], alone[0]), row


def test_a_loaded_artifact_generates_quantized(smollm2, smollm2_artifact):
    proc, directory = smollm2_artifact
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tokenizer = smollm2
    loaded = qcompile.load(model, directory, progress=False)
    prompt = _prompts(tokenizer, 1, 16)[0]
    with torch.no_grad():
        tokens = loaded.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        logits = loaded(tokens, use_cache=False).logits
    assert torch.equal(logits[:, 15:-1].argmax(-1), tokens[:, 16:])
    assert loaded.graphs and all(g.count_ops(torch.ops.q4.linear_w4a4) > 0 for g in loaded.graphs)
