"""Exactness: with rounding disabled (`options={"rounding": False}`, `Q4_ROUNDING=0`), the w4a4
pipeline (migrate-scales, rotate-inputs and everything folded into constants) must compute the
model's own function: max relative error <= 1e-4, on real inputs of the real models and on tiny
random-weight models of every supported family."""

from __future__ import annotations

import pytest
import torch

from qcompile.backends import q4 as q4_backend
from qcompile.tools import zoo
from qcompile.tools.accuracy import sentences
from tests.helpers.models import tiny_model

TOLERANCE = 1e-4


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def compile_unrounded(model, calibration):
    torch._dynamo.reset()
    return torch.compile(model, backend="q4", options={
        "recipe": "w4a4", "rounding": False, "lower": "eager", "progress": False, "calibration": calibration})


def check_exact(model, calibration, run_kwargs, output):
    with torch.no_grad():
        expected = output(model(**run_kwargs))
        got = output(compile_unrounded(model, calibration)(**run_kwargs))
    (artifact,) = q4_backend.compiled_graphs()[-1:]
    # the passes that change constants did run: migrated and rotated weights are in the graph
    assert artifact.count_ops(torch.ops.q4.rotate.default) > 0
    assert any(name.endswith("_migrated") for name, _ in artifact.graph_module.named_buffers())
    assert artifact.count_ops(torch.ops.q4.quantize_per_tensor.default) == 0
    error = max_relative_error(got, expected)
    assert error <= TOLERANCE, error


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "opt", "phi3", "bert"])
def test_tiny_models_are_exact_without_rounding(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(7)
    calibration = [{"input_ids": torch.randint(1, 256, (2, 12), generator=g)}]
    run = {"input_ids": torch.randint(1, 256, (2, 12), generator=g)}
    if family == "bert":
        check_exact(model, calibration, run, lambda out: out.last_hidden_state)
    else:
        check_exact(model, calibration, {**run, "use_cache": False}, lambda out: out.logits)


@pytest.mark.model
def test_smollm2_is_exact_without_rounding(smollm2):
    model, tokenizer = smollm2
    calibration = [{"input_ids": zoo.token_windows(tokenizer, "emma", 64, 64)[0]}]
    run = {"input_ids": zoo.token_windows(tokenizer, "pride_and_prejudice", 64, 64)[0], "use_cache": False}
    check_exact(model, calibration, run, lambda out: out.logits)


@pytest.mark.model
def test_minilm_is_exact_without_rounding():
    model, tokenizer = zoo.load_minilm()
    calibration = [dict(tokenizer(sentences("emma", 8), padding=True, return_tensors="pt"))]
    run = dict(tokenizer(sentences("pride_and_prejudice", 8), padding=True, return_tensors="pt"))
    check_exact(model, calibration, run, lambda out: out.last_hidden_state)
