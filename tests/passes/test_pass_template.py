"""Test template for a pass: copy this file to `tests/passes/test_<your_pass>.py` and change the
lines marked `# COPY:`. As it stands it tests `remove-eval-dropout`, the pass of
`examples/custom_pass.py` (a pass registered outside qcompile); `docs/writing-a-pass.md` walks
through both.

What each test checks, on the IR the pipeline would hand the pass (`qcompile.api.testing.capture`):

- the printed graph before and after (`torch.testing.FileCheck`): before holds what the pass
  rewrites, after does not, and holds what it becomes;
- the graph computes the same numbers before and after, on the same inputs;
- the pass's statistics count what it did; a second run changes nothing (`modified=False`);
- an option of the pass, as the pipeline string writes it;
- the pass runs by name inside a pipeline, through `torch.compile(..., backend="q4")`.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.backends import q4 as q4_backend
from qcompile.core.pipeline import parse_pipeline
from qcompile.core.recipes import recipe_pipeline

ROOT = Path(__file__).resolve().parents[2]


def import_file(path: Path):
    """Import a .py file under its stem, as `qcompile passes --import FILE.py` does."""
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[path.stem]


# COPY: import your pass; a pass of qcompile's: `from qcompile.passes.my_pass import MyPass`.
RemoveEvalDropout = import_file(ROOT / "examples" / "custom_pass.py").RemoveEvalDropout
PASS = RemoveEvalDropout


class Model(torch.nn.Module):
    """COPY: a small module whose graph holds what your pass rewrites (here: two eval dropouts)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.drop = torch.nn.Dropout(0.1)
        self.proj = torch.nn.Linear(16, 8)
        self.out_drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.out_drop(torch.relu(self.proj(self.drop(self.norm(x)))))


INPUTS = (torch.randn(2, 3, 16),)  # COPY: example inputs of your module
BEFORE = "aten.dropout.default"  # COPY: text the graph holds before the pass ...
GONE = "aten.dropout.default"  # COPY: ... text it no longer holds after ...
AFTER = "aten.linear.default(layer_norm"  # COPY: ... and text it holds after (the linear reads the norm)
STATS = {"dropouts-removed": 2, "dropouts-kept": 0}  # COPY: your statistics on Model ...
STATS_SECOND_RUN = {"dropouts-removed": 0, "dropouts-kept": 0}  # COPY: ... and on its own output
OPTIONS = "only=out_drop"  # COPY: an option of your pass, as a pipeline writes it ...
STATS_WITH_OPTIONS = {"dropouts-removed": 1, "dropouts-kept": 1}  # COPY: ... and its statistics
PIPELINE = f"{PASS.name}," + recipe_pipeline("w4a4-rtn")  # COPY: a pipeline your pass runs in


def graph():
    """The IR the pass sees: captured, normalized, frozen and calibrated, as in the pipeline."""
    torch.manual_seed(0)
    return capture(Model().eval(), *INPUTS)


def run_pass(gm, options: str = ""):
    """(PassResult, statistics) of one run of the pass, built from a pipeline string as the
    pass manager builds it (so the options are parsed exactly as `{...}` in a pipeline)."""
    qpass = parse_pipeline(f"{PASS.name}{{{options}}}" if options else PASS.name)[0].instantiate()
    result = qpass(gm)
    return result, dict(qpass.stats)


def test_before_after_ir():
    gm = graph()
    FileCheck().check(BEFORE).run(gm.code)

    result, _ = run_pass(gm)

    assert result.modified
    FileCheck().check_not(GONE).run(result.graph_module.code)
    FileCheck().check(AFTER).run(result.graph_module.code)
    result.graph_module.graph.lint()


def test_same_numbers_before_and_after():
    gm = graph()
    expected = copy.deepcopy(gm)(*INPUTS)
    after = run_pass(gm)[0].graph_module(*INPUTS)
    # COPY: exact for a pass that keeps the arithmetic; a pass that changes it needs a tolerance
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_statistics():
    _, stats = run_pass(graph())
    assert stats == STATS


def test_second_run_changes_nothing():
    first, _ = run_pass(graph())
    code = first.graph_module.code
    second, stats = run_pass(first.graph_module)
    assert not second.modified and second.graph_module.code == code
    assert stats == STATS_SECOND_RUN


def test_an_option():
    result, stats = run_pass(graph(), OPTIONS)
    assert result.modified and stats == STATS_WITH_OPTIONS
    FileCheck().check_count(BEFORE, 1, exactly=True).run(result.graph_module.code)


def test_runs_by_name_in_a_pipeline():
    model = Model().eval()
    compiled = torch.compile(model, backend="q4", options={
        "pipeline": PIPELINE, "calibration": [INPUTS], "lower": "eager", "progress": False,
        "rounding": False})  # rounding=False: the compiled graph must compute the model's function
    with torch.no_grad():
        out, expected = compiled(*INPUTS), model(*INPUTS)
    artifact = q4_backend.compiled_graphs()[-1]
    assert parse_pipeline(artifact.pipeline).names() == parse_pipeline(PIPELINE).names()
    record = next(r for r in artifact.records if r.name == PASS.name)
    assert record.modified and record.stats == STATS
    FileCheck().check_not(GONE).run(artifact.graph_module.code)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
