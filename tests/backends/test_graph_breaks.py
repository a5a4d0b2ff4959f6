"""Graph breaks and dynamic shapes: calibration batches reach every graph, once.

A model with graph breaks compiles into several graphs, some starting after a break (Dynamo's
resume functions), some a submodule's forward that Dynamo compiles on its own once its caller
broke. Calibration runs the model the user called on the batches, once, watching every weight;
each graph then takes its linears' statistics from that one run, under the same recipe. New
sequence lengths and batch sizes recompile a bounded number of times and never calibrate again.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qcompile.backends.q4 import Q4Backend
from qcompile.core import qlinear
from qcompile.frontend import calibrate
from qcompile.frontend.calibrate import CalibrationCache
from qcompile.tools.tiny_models import FAMILIES
from tests.helpers.models import tiny_llama

QUIET = {"progress": False, "lower": "eager"}


class _Block(torch.nn.Module):
    """Norm, two linears, and in between what breaks a graph: a data-dependent branch (an
    overflow clamp) and a print."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x):
        h = torch.relu(self.up(self.norm(x)))
        if h.abs().amax() > 1e4:  # a Python branch on a tensor's value: a graph break
            h = h.clamp(-1e4, 1e4)
        print("", end="")  # another graph break
        return x + self.down(h)


class _Broken(torch.nn.Module):
    """A linear, two blocks that break, a linear. (Called in a Python loop, the blocks would make
    Dynamo skip this forward altogether: a break inside a loop runs the frame eagerly, so `inp`
    and `out` would stay float, out of any graph q4 sees.)"""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(width, width)
        self.block0 = _Block(width)
        self.block1 = _Block(width)
        self.out = torch.nn.Linear(width, 8)

    def forward(self, x):
        return self.out(self.block1(self.block0(self.inp(x))))


def _batches(count: int = 3, width: int = 32) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 5 + i, width, generator=g),) for i in range(count)]


def _count_calibrations(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = calibrate.observe_model
    monkeypatch.setattr(calibrate, "observe_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_every_graph_after_a_break_gets_statistics_of_the_one_calibration_run(monkeypatch):
    model, batches = _Broken().eval(), _batches()
    calls = _count_calibrations(monkeypatch)
    graphs, cache = [], CalibrationCache()
    backend = Q4Backend({"calibration": batches, "recipe": "w4a4-rtn", **QUIET}, calibration_cache=cache,
                        on_compiled=lambda graph, _inputs: graphs.append(graph))
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the block graph serves two instances: a warning says so
        torch.compile(model, backend=backend)(*batches[0])
    assert len(graphs) >= 3  # the breaks did split it (the blocks' own forwards among them)
    assert len(calls) == 1
    # every linear's statistics are those of one eager run over all the batches, under its full name
    linears = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = calibrate.observe_model(model, batches, {w: name for name, w in linears.items()})
    for name, weight in linears.items():
        assert torch.equal(cache.get(weight, batches, False).absmax, expected[name].absmax), name
    # and each runs quantized in one of the graphs (block1's is block0's graph compiled for its weights)
    assert sum(g.count_ops(torch.ops.q4.linear_w4a4.default) for g in graphs) == len(linears) == 6


def test_a_model_with_graph_breaks_compiles_with_calibration_batches(monkeypatch):
    model, batches = _Broken().eval(), _batches()
    calls = _count_calibrations(monkeypatch)
    graphs = []
    backend = Q4Backend({"calibration": batches, "recipe": "w4a4-rtn", **QUIET},
                        on_compiled=lambda graph, _inputs: graphs.append(graph))
    torch._dynamo.reset()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend=backend)(x)
        expected = model(x)
    said = [str(w.message) for w in caught if "qcompile" in str(w.message)]
    # batches given: no "calibrating on the first call" warning; one for each graph of the block's
    # forward (before and after its breaks) that block1 reuses and gets compiled for its own weights
    assert said and all("serves several module instances" in w for w in said), said
    assert len(calls) == 1
    assert len({g.pipeline for g in graphs}) == 1  # one recipe for every graph
    fused = sum(g.count_ops(torch.ops.q4.linear_w4a4.default) for g in graphs)
    assert fused == sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # all 6, across the graphs
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.95


@pytest.mark.slow
def test_bart_in_fp16_breaks_on_its_overflow_clamp_and_still_calibrates(monkeypatch):
    """BART's encoder layer checks its fp16 activations for inf (`if ... torch.isinf(h).any()`):
    in fp16 each layer's forward breaks there and Dynamo compiles it as a graph of its own."""
    family = FAMILIES["bart"]
    model = family.build(dtype=torch.float16)
    calls = _count_calibrations(monkeypatch)
    graphs = []
    backend = Q4Backend({"calibration": [family.inputs(1), family.inputs(2)], "recipe": "w4a4-rtn", **QUIET},
                        on_compiled=lambda graph, _inputs: graphs.append(graph))
    torch._dynamo.reset()
    run = family.inputs(3)
    with torch.no_grad():
        got = family.output(torch.compile(model, backend=backend)(**run)).float()
        expected = family.output(model(**run)).float()
    assert len(calls) == 1 and len(graphs) > 1
    quantized = [n for g in graphs for n in g.graph_module.graph.nodes
                 if (q := qlinear.match(n)) is not None and q.quantized]
    # every linear of the encoder-decoder but the head (w4a4-rtn's skip), each in one of the graphs
    # (the encoder layers' graph: compiled for each layer's weights)
    assert len(quantized) == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9


@pytest.mark.slow
def test_lengths_8_to_512_and_batches_1_to_4_recompile_a_bounded_number_of_times(monkeypatch):
    model = tiny_llama()
    calls = _count_calibrations(monkeypatch)
    graphs = []
    g = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(1, 256, (2, 32), generator=g)}]
    backend = Q4Backend({"calibration": calibration, "recipe": "w4a4-rtn", "progress": False},
                        on_compiled=lambda graph, _inputs: graphs.append(graph))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for seq in (8, 16, 33, 64, 128, 255, 512):
            for batch in (1, 2, 3, 4):
                ids = torch.randint(1, 256, (batch, seq), generator=g)
                logits = compiled(input_ids=ids, use_cache=False).logits
                assert logits.shape == (batch, seq, 256) and torch.isfinite(logits).all()
    assert len(calls) == 1  # no recalibration
    # a static graph for the first shape, then Dynamo's automatic dynamic shapes: a symbolic
    # batch, a symbolic length (batch 1 stays specialized: Dynamo treats size-1 dims apart), both
    assert len(graphs) <= 4, len(graphs)
