"""Exactness: with rounding disabled (`options={"rounding": False}`, `Q4_ROUNDING=0`), the w4a4
pipelines (migrate-scales, split-channels, rotate-inputs and everything folded into constants) must compute the
model's own function: max relative error <= 1e-4, on real inputs of the real models and on tiny
random-weight models of every supported family; with the fixed rotation (w4a4-hadamard) and the
default's learned ones (orthogonal factors of each group's own; fewer steps here, see
tests/helpers/recipes.py), and with split channels."""

from __future__ import annotations

import pytest
import torch

from qcompile.algorithms import split_channels
from qcompile.algorithms.metrics import max_relative_error
from qcompile.backends import q4 as q4_backend
from qcompile.core.recipes import RECIPES
from qcompile.tools import zoo
from qcompile.tools.accuracy import sentences
from tests.helpers.models import tiny_model
from tests.helpers.passes import forced_split
from tests.helpers.recipes import quick

TOLERANCE = 1e-4
# w4a4 learns its rotations; w4a4-split splits channels (MergeQuant's dimensional reconstruction)
PIPELINES = {"w4a4-hadamard": RECIPES["w4a4-hadamard"], "w4a4": quick("w4a4"), "w4a4-split": RECIPES["w4a4-split"]}


def compile_unrounded(model, calibration, pipeline):
    torch._dynamo.reset()
    return torch.compile(model, backend="q4", options={
        "pipeline": PIPELINES[pipeline], "rounding": False, "lower": "eager", "progress": False,
        "calibration": calibration})


def check_exact(model, calibration, run_kwargs, output, pipeline):
    with torch.no_grad():
        expected = output(model(**run_kwargs))
        got = output(compile_unrounded(model, calibration, pipeline)(**run_kwargs))
    (artifact,) = q4_backend.compiled_graphs()[-1:]
    # the passes that change constants did run: migrated and rotated weights are in the graph
    rotations = [n for n in artifact.graph_module.graph.nodes if n.target is torch.ops.q4.rotate.default]
    assert rotations
    if pipeline == "w4a4":  # some groups kept learned factors (flagged hadamard=False)
        assert any(n.kwargs.get("hadamard") is False for n in rotations)
    buffers = [name for name, _ in artifact.graph_module.named_buffers()]
    # w4a4-split: some groups split channels (their migrated weights are then named `_split`)
    assert any(name.endswith("_split_index" if pipeline == "w4a4-split" else "_migrated") for name in buffers)
    assert artifact.count_ops(torch.ops.q4.quantize_per_tensor.default) == 0
    error = max_relative_error(got, expected)
    assert error <= TOLERANCE, error


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "opt", "phi3", "bert"])
def test_tiny_models_are_exact_without_rounding(family, pipeline, monkeypatch):
    """(Random tiny models have no outlier channel worth a split: w4a4-split's groups are split
    by a stand-in for the choice here, the real models' by the output error.)"""
    monkeypatch.setattr(split_channels, "choose_split", forced_split)
    model = tiny_model(family)
    g = torch.Generator().manual_seed(7)
    calibration = [{"input_ids": torch.randint(1, 256, (2, 12), generator=g)}]
    run = {"input_ids": torch.randint(1, 256, (2, 12), generator=g)}
    if family == "bert":
        check_exact(model, calibration, run, lambda out: out.last_hidden_state, pipeline)
    else:
        check_exact(model, calibration, {**run, "use_cache": False}, lambda out: out.logits, pipeline)


@pytest.mark.model
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_smollm2_is_exact_without_rounding(smollm2, pipeline):
    model, tokenizer = smollm2
    calibration = [{"input_ids": zoo.token_windows(tokenizer, "emma", 64, 64)[0]}]
    run = {"input_ids": zoo.token_windows(tokenizer, "pride_and_prejudice", 64, 64)[0], "use_cache": False}
    check_exact(model, calibration, run, lambda out: out.logits, pipeline)


@pytest.mark.model
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_minilm_is_exact_without_rounding(pipeline):
    model, tokenizer = zoo.load_minilm()
    calibration = [dict(tokenizer(sentences("emma", 8), padding=True, return_tensors="pt"))]
    run = dict(tokenizer(sentences("pride_and_prejudice", 8), padding=True, return_tensors="pt"))
    check_exact(model, calibration, run, lambda out: out.last_hidden_state, pipeline)
