"""qcompile.api.explain on tiny random-weight models: every linear reported, SQNR that tracks the
bits, the pass table and the pipeline that reproduces it, the model left alone, clear errors."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from qcompile.api.explain import ExplainReport, LinearRow, explain
from qcompile.core.pass_api import PipelineError
from qcompile.core.pipeline import parse_pipeline
from qcompile.core.recipes import RECIPES
from qcompile.tools.explain import main
from tests.helpers.models import tiny_bert, tiny_llama

QUIET = {"progress": False}


def ids(seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seed))


def llama_inputs() -> dict:
    return {"input_ids": ids(), "use_cache": False}


def linear_paths(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def median_sqnr(report: ExplainReport) -> float:
    return statistics.median(r.sqnr_db for r in report.linears if r.sqnr_db is not None)


@pytest.fixture(scope="module")
def llama_default():
    """The default recipe (w4a4) on tiny Llama, shared by the tests that only read the report."""
    torch._dynamo.reset()
    model = tiny_llama()
    return model, explain(model, llama_inputs(), **QUIET)


def test_every_linear_appears_with_finite_sqnr(llama_default):
    model, report = llama_default
    rows = report.linears
    assert [r.module for r in rows] == linear_paths(model)  # graph order = module order; 2 x 7 + lm_head
    assert all(isinstance(r, LinearRow) and r.graph == 0 for r in rows)
    assert all(r.sqnr_db is not None and math.isfinite(r.sqnr_db) and r.sqnr_db > 5 for r in rows)
    assert all(r.quantized and r.float_reason == "" for r in rows)
    runs = {r.module: r.runs_as for r in rows}
    assert runs["lm_head"] == "W4A8 fused g32"
    assert {runs[m] for m in runs if m != "lm_head"} == {"W4A4 fused g32"}
    q = report.linear("model.layers.0.self_attn.q_proj")
    assert (q.w_bits, q.a_bits, q.migration) == (4, 4, "migrated")
    assert q.rotation in ("learned", "hadamard (learned was worse)")  # the default learns rotations
    # analyze-outliers' ratio before migration, and the measured one after: both real ratios >= 1
    assert all(r.outliers_before >= 1 and r.outliers_after >= 1 for r in rows)
    # the lm_head (8-bit activations) is measured more precisely than the W4A4 median
    assert report.linear("lm_head").sqnr_db > median_sqnr(report)
    # the default recipe steps each sequence's first token apart (its rotary positions say which)
    assert {r.first_token for r in rows} == {"8-bit"}
    assert "first token" in report.linear_table().splitlines()[0]


def test_pass_table_matches_the_pipeline(llama_default):
    _, report = llama_default
    assert report.pipeline == RECIPES["w4a4"]
    specs = parse_pipeline(report.pipeline)
    assert [p.spec for p in report.passes] == [str(s) for s in specs]
    assert [p.name for p in report.passes] == specs.names()
    assert [p.index for p in report.passes] == list(range(len(specs)))
    by_name = {p.name: p for p in report.passes}
    assert not by_name["analyze-outliers"].changed and by_name["analyze-outliers"].stats["linears-analyzed"] == 15
    assert by_name["fuse-kernels"].changed and by_name["fuse-kernels"].stats["linears-fused"] == 15
    inserts = [p for p in report.passes if p.name == "insert-quantizers"]
    assert [p.stats["linears-quantized"] for p in inserts] == [14, 1]  # the head last
    assert "a-bits=8" in inserts[1].options and "rounding=true" in inserts[1].options  # all effective options
    assert all(p.seconds >= 0 for p in report.passes)
    text = str(report)
    for spec in specs:
        assert str(spec) in text
    assert f"Q4_PIPELINE='{report.pipeline}'" in text
    assert "model.layers.1.mlp.down_proj" in text and "W4A8 fused" in text
    assert text.count("\n") > len(report.linears) + len(report.passes)
    assert "summary: 15 linears in 1 graph: 15 quantized, 0 float" in text


def test_pipeline_string_reproduces_the_rows(llama_default):
    model, report = llama_default
    again = explain(model, llama_inputs(), pipeline=report.pipeline, **QUIET)
    assert again.pipeline == report.pipeline
    assert again.linears == report.linears


def test_float_linears_give_their_reason():
    model = tiny_llama()
    report = explain(model, llama_inputs(), recipe="w4a4-rtn", **QUIET)  # skip=lm_head
    head = report.linear("lm_head")
    assert (head.runs_as, head.w_bits, head.sqnr_db) == ("float", None, None)
    assert "skip" in head.float_reason and "lm_head" in head.float_reason
    assert not head.quantized and head.outliers_after is not None
    assert all(math.isfinite(r.sqnr_db) for r in report.linears if r.module != "lm_head")
    assert "14 quantized, 1 float" in report.summary()
    # a pipeline without insert-quantizers leaves everything in float, and says so
    plain = explain(model, llama_inputs(), pipeline="analyze-outliers,fold-scales", **QUIET)
    assert {r.runs_as for r in plain.linears} == {"float"}
    assert {r.float_reason for r in plain.linears} == {"no insert-quantizers pass in the pipeline"}
    assert all(r.sqnr_db is None and r.migration == "-" for r in plain.linears)


def test_sqnr_tracks_the_activation_bits():
    model = tiny_llama()
    w4a4 = explain(model, llama_inputs(), recipe="w4a4-rtn", **QUIET)
    w4a8 = explain(model, llama_inputs(), pipeline="analyze-outliers,fold-scales,insert-quantizers{w-bits=4,a-bits=8},"
                   "fuse-kernels", **QUIET)
    pairs = [(a.sqnr_db, b.sqnr_db) for a, b in zip(w4a4.linears, w4a8.linears) if a.sqnr_db is not None]
    assert len(pairs) == 14
    # every linear gains from 4 more activation bits (measured +4.4 dB median: the 4-bit
    # round-to-nearest weights' error is left)
    assert all(b > a + 3 for a, b in pairs)
    # the recipes too: w4a8 well above w4a4 (measured 27.3 against 18.1 dB median)
    assert median_sqnr(explain(model, llama_inputs(), recipe="w4a8", **QUIET)) > median_sqnr(
        explain(model, llama_inputs(), recipe="w4a4", **QUIET)) + 5


def test_no_rounding_is_exact():
    model = tiny_llama()
    report = explain(model, llama_inputs(), rounding=False, **QUIET)
    assert "rounding=false" in report.pipeline
    assert {r.runs_as for r in report.linears} == {"W4A4 not rounded", "W4A8 not rounded"}
    assert report.linear("lm_head").runs_as == "W4A8 not rounded" and report.linear("lm_head").float_reason == ""
    assert all(r.sqnr_db == math.inf and not r.quantized for r in report.linears)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # inf is written as "inf"
    assert {r["sqnr_db"] for g in data["graphs"] for r in g["linears"]} == {"inf"}


def test_weight_only_and_unfused_forms():
    model = tiny_llama()
    weight_only = explain(model, llama_inputs(), recipe="w4a16", **QUIET)
    rows = [r for r in weight_only.linears if r.module != "lm_head"]
    assert {r.runs_as for r in rows} == {"W4A16 weight-only g32"} and all(r.a_bits == 16 for r in rows)
    assert all(math.isfinite(r.sqnr_db) for r in rows)
    unfused = explain(model, llama_inputs(), recipe="w4a4-rtn", disable="fuse-kernels", **QUIET)
    fused = explain(model, llama_inputs(), recipe="w4a4-rtn", **QUIET)
    assert "fuse-kernels" not in unfused.pipeline
    assert {r.runs_as for r in unfused.linears if r.module != "lm_head"} == {"W4A4 fake-quant"}
    # the fused integer kernel computes the fake-quantized linear (up to float rounding)
    for a, b in zip(unfused.linears, fused.linears):
        assert a.module == b.module
        if a.sqnr_db is not None:
            assert a.sqnr_db == pytest.approx(b.sqnr_db, abs=0.05)


def test_bert_positional_inputs():
    model = tiny_bert()
    report = explain(model, (ids(12),), **QUIET)
    assert [r.module for r in report.linears] == linear_paths(model)  # 2 x 6 + pooler
    assert all(r.runs_as == "W4A4 fused g32" and math.isfinite(r.sqnr_db) for r in report.linears)
    # its positions come from an arange buffer (absolute position embeddings): [CLS] is stepped
    # apart, except in the pooler, which reads [CLS] alone (no sequence dim)
    first = {r.module: r.first_token for r in report.linears}
    assert first.pop("pooler.dense") == "none: its input is not [batch, tokens, channels] over the positions' tokens"
    assert set(first.values()) == {"8-bit"}


def test_model_is_not_mutated():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    explain(model, llama_inputs(), **QUIET)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grads == {k: p.requires_grad for k, p in model.named_parameters()}
    assert not model.training
    assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


class _Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_breaks_are_reported_per_graph():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    report = explain(_Broken().eval(), (x,), recipe="w4a4-rtn", **QUIET)
    assert len(report.graphs) == 2
    assert [(r.graph, r.module) for r in report.linears] == [(0, "a"), (1, "b")]
    assert all(r.runs_as == "W4A4 fused" and math.isfinite(r.sqnr_db) for r in report.linears)
    assert [p.graph for p in report.passes] == [0] * 4 + [1] * 4
    assert "2 linears in 2 graphs" in str(report)
    # calibration batches reach the graph after the break too (one run of the model)
    calibrated = explain(_Broken().eval(), (x,), recipe="w4a4-rtn", calibration=[(x,), (2 * x,)], **QUIET)
    assert [(r.graph, r.module, r.runs_as) for r in calibrated.linears] == [(0, "a", "W4A4 fused"), (1, "b", "W4A4 fused")]


def test_bad_input_gives_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown recipe 'w3a3'; known recipes: w4a4-rtn"):
        explain(model, llama_inputs(), recipe="w3a3")
    with pytest.raises(TypeError, match="needs a torch.nn.Module, got function"):
        explain(lambda x: x, (ids(),))
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        explain(model, "hello")
    with pytest.raises(ValueError, match="unknown q4 option 'recipes'"):
        explain(model, llama_inputs(), recipes="w4a4")
    with pytest.raises(PipelineError, match="no-such-pass"):
        explain(model, llama_inputs(), pipeline="analyze-outliers,no-such-pass")
    # the model's own error, as it raises it (not wrapped in Dynamo's)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        explain(model, {"input_idz": ids()}, **QUIET)


def test_report_to_dict_is_json(llama_default):
    _, report = llama_default
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["pipeline"] == report.pipeline and data["summary"] == report.summary()
    (graph,) = data["graphs"]
    assert [r["module"] for r in graph["linears"]] == [r.module for r in report.linears]
    assert graph["linears"][0]["runs_as"] == "W4A4 fused g32" and graph["linears"][0]["quantized"] is True
    assert [p["spec"] for p in graph["passes"]] == [str(s) for s in parse_pipeline(report.pipeline)]


def test_cli_help_and_bad_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "qcompile explain" in out and "--tokens" in out and "--json" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--recipe", "nope"])
    assert exit_.value.code == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe,runs_as", [("fp4-e2m1", "FP4 e2m1/e2m1 fused g32"), ("w4a4-dynamic", "W4A4 fused dynamic g32")])
def test_fp4_and_dynamic_linears_say_so(recipe, runs_as):
    """An FP4 linear names its weight / activation formats; a dynamic one its per-token steps."""
    model = tiny_llama()
    report = explain(model, llama_inputs(), recipe=recipe, **QUIET)
    rows = [r for r in report.linears if r.module != "lm_head"]
    assert rows and {r.runs_as for r in rows} == {runs_as}
    assert all(r.sqnr_db is not None and math.isfinite(r.sqnr_db) for r in rows)


@pytest.mark.parametrize("rate,kept", [("0.05", "learned"), ("1e-12", "hadamard (learned was worse)")])
def test_learned_rotations_say_whether_they_were_kept(rate, kept):
    """rotate-inputs{learn-steps}: each linear says whether its learned rotation was kept; one that
    does not lower the error (a rate too small to move the factors) keeps the Hadamard one."""
    pipeline = str(parse_pipeline(RECIPES["w4a4"]).with_option("rotate-inputs", "learn-steps", "10")
                   .with_option("rotate-inputs", "learn-rate", rate))
    report = explain(tiny_llama(), llama_inputs(), pipeline=pipeline, **QUIET)
    assert {r.rotation for r in report.linears if r.module.endswith("down_proj")} == {"hadamard"}  # learn-skip
    rotations = [r.rotation for r in report.linears if not r.module.endswith("down_proj")]
    assert kept in rotations and set(rotations) <= {"learned", "hadamard (learned was worse)"}
    if kept != "learned":
        assert set(rotations) == {kept}
    table = report.linear_table()
    assert "rotation" in table.splitlines()[0] and kept in table
    assert all(math.isfinite(r.sqnr_db) for r in report.linears)


def test_split_channels_show_how_many_channels_each_linear_gained():
    """split-channels{budget}: the linears of a split group say how many input channels they
    gained; the quantized model still matches its float reference closely."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 40  # one outlier channel for q/k/v
    pipeline = ("analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},split-channels{budget=8},"
                "fold-scales,insert-quantizers{w-bits=4,a-bits=4,search-clip=true},fuse-kernels")
    report = explain(model, llama_inputs(), pipeline=pipeline, **QUIET)
    qkv = [r for r in report.linears if ".layers.0.self_attn." in r.module and not r.module.endswith("o_proj")]
    assert len(qkv) == 3 and len({r.split for r in qkv}) == 1 and 1 <= qkv[0].split <= 8
    assert {r.runs_as for r in qkv} == {"W4A4 fused"}
    table = report.linear_table()
    assert "split" in table.splitlines()[0] and f"+{qkv[0].split}" in table
    assert {row["split"] for row in report.to_dict()["graphs"][0]["linears"]} >= {0, qkv[0].split}
