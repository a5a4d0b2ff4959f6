"""generate() on a q4-compiled tiny Llama: every form users write quantizes, and nothing else changes.

The real model's generation (accuracy through the cache, compile counts, left padding) is tested
in tests/examples/test_generate_smollm2.py.
"""

from __future__ import annotations

import pytest
import torch

import qcompile
from tests.helpers.backend import counting_backend
from tests.helpers.models import ids, tiny_llama

GENERATE = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def _calibration() -> list[dict]:
    return [{"input_ids": ids(32, seed=s)} for s in range(2)]


def _options(calibration: list) -> dict:
    return {"recipe": "w4a4-rtn", "calibration": calibration, "progress": False}


@pytest.mark.slow
def test_torch_compile_module_generate_quantizes_like_the_compiled_forward():
    """`torch.compile(model, backend="q4").generate(...)` compiles q4 graphs (torch alone would
    generate in float with the uncompiled original) and gives the tokens of the documented
    `model.forward = torch.compile(model.forward, ...)` form; the model is left as it was."""
    model, calibration, prompt = tiny_llama(), _calibration(), ids(10, seed=9)
    with torch.no_grad():
        float_tokens = model.generate(prompt, **GENERATE)
        backend, graphs = counting_backend(_options(calibration))
        tokens = torch.compile(model, backend=backend).generate(prompt, **GENERATE)
    assert len(graphs) >= 2  # the prompt and the decode steps
    assert all(g.count_ops(torch.ops.q4.linear_w4a4) > 0 for g in graphs)
    assert "forward" not in model.__dict__  # the original's forward is its own again
    assert not torch.equal(tokens, float_tokens)

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="q4", options=_options(calibration))
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **GENERATE), tokens)


@pytest.mark.slow
def test_the_prompt_and_decode_graphs_share_their_quantized_weights(monkeypatch):
    """Each compile (the prompt's graph, the decode step's) packs the weights again; the later
    graph reads the earlier one's equal tensors (`memory.ConstantPool`), so a generating model
    holds one copy of its quantized weights, not one a graph; the tokens are those of graphs
    holding a copy each."""
    from qcompile.core.memory import ConstantPool

    calibration, prompt = _calibration(), ids(10, seed=9)

    def generate() -> tuple[torch.Tensor, list[list[int]]]:
        torch._dynamo.reset()
        model = tiny_llama()
        backend, graphs = counting_backend(_options(calibration))
        model.forward = torch.compile(model.forward, backend=backend, dynamic=False)
        with torch.no_grad():
            tokens = model.generate(prompt, **GENERATE)
        assert len(graphs) >= 2
        return tokens, [[getattr(g.graph_module, n.args[1].target).data_ptr() for n in g.graph_module.graph.nodes
                         if n.target is torch.ops.q4.linear_w4a4.default] for g in graphs]

    tokens, pointers = generate()
    assert len(pointers[0]) == 14 and all(p == pointers[0] for p in pointers[1:])
    with monkeypatch.context() as patch:
        patch.setattr(ConstantPool, "share", lambda self, t: t)
        own_tokens, own_pointers = generate()
    assert not set(own_pointers[0]) & set(own_pointers[1])  # without the pool: a copy a graph
    assert torch.equal(tokens, own_tokens)


def test_other_backends_keep_torchs_generate():
    model = tiny_llama()
    compiled = torch.compile(model, backend="eager")
    assert compiled.generate.__func__ is type(model).generate


@pytest.mark.slow
def test_quantized_model_generates_through_its_compiled_forward():
    model, calibration, prompt = tiny_llama(), _calibration(), ids(10, seed=9)
    qmodel = qcompile.quantize(model, calibration, recipe="w4a4-rtn", progress=False)
    before = len(qmodel.graphs)
    with torch.no_grad():
        tokens = qmodel.generate(prompt, **GENERATE)
        logits = qmodel(tokens, use_cache=False).logits
    assert len(qmodel.graphs) > before  # decode graphs, quantized like the first
    # greedy: each new token is the argmax of the quantized model's own logits at its position
    assert torch.equal(logits[0, 9:-1].argmax(-1), tokens[0, 10:])


@pytest.mark.slow
def test_transformers_compile_hook_with_the_q4_backend():
    """transformers compiles the decode steps itself when `generation_config.compile_config`
    asks (a static cache; on CPU only with `_compile_all_devices`); the prompt runs uncompiled.
    The cache holds the model's own values either way (o_proj's migration is a multiply of its
    own, not v_proj's rows), so the float prompt and the q4 decode steps fit together."""
    from transformers import CompileConfig

    model, calibration, prompt = tiny_llama(), _calibration(), ids(10, seed=9)
    backend, graphs = counting_backend(_options(calibration))
    config = CompileConfig(backend=backend, mode=None, fullgraph=False)
    config._compile_all_devices = True
    model.generation_config.compile_config = config
    with torch.no_grad():
        tokens = model.generate(prompt, cache_implementation="static", **GENERATE)
    assert tokens.shape == (1, 16)
    assert graphs and all(g.count_ops(torch.ops.q4.linear_w4a4) > 0 for g in graphs)


def test_a_prompt_longer_than_the_static_cache_is_a_clear_error():
    """Found when the graph is compiled (before calibrating), and at each call of a graph
    compiled for shorter prompts, never an out-of-bounds index deep in compiled code."""
    from transformers import StaticCache

    model = tiny_llama()
    model.forward = torch.compile(model.forward, backend="q4",
                                  options={**_options(_calibration()), "lower": "eager"})
    with torch.no_grad():
        with pytest.raises(Exception, match="the input has 12 tokens but the static KV cache holds 8"):
            model.generate(ids(12, seed=9), past_key_values=StaticCache(config=model.config, max_cache_len=8),
                           **GENERATE)
        for length in (5, 7):  # a graph for every prompt length (dynamic), within a cache of 16
            model(ids(length, seed=9), past_key_values=StaticCache(config=model.config, max_cache_len=16))
        with pytest.raises(Exception, match="the input has 20 tokens but the static KV cache holds 16"):
            model(ids(20, seed=9), past_key_values=StaticCache(config=model.config, max_cache_len=16))


@pytest.mark.slow
def test_generate_with_another_models_artifact_is_an_artifact_error(tmp_path):
    model, other = tiny_llama(), tiny_llama(seed=1)
    qcompile.quantize(model, _calibration(), recipe="w4a4-rtn", progress=False, lower="eager").save(tmp_path / "a")
    compiled = torch.compile(other, backend="q4", options={"artifact": str(tmp_path / "a"), "lower": "eager"})
    with pytest.raises(Exception, match=r"different model: parameter '.*' differs") as raised, torch.no_grad():
        compiled.generate(ids(10, seed=9), **GENERATE)
    # as for a plain call: Dynamo's BackendCompilerFailed around the backend's ArtifactError
    assert isinstance(getattr(raised.value, "inner_exception", raised.value), qcompile.ArtifactError)
