"""End to end through torch.compile(backend="q4") on tiny random-weight transformers models."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import qcompile.backends.q4 as q4_backend
from qcompile.core import qlinear
from qcompile.core.recipes import RECIPES
from qcompile.kernels import formats, reference
from tests.helpers.backend import EAGER, compile_and_run
from tests.helpers.models import ids, tiny_llama

# Tests of the pipeline's mechanics read the shortest recipe's stages.
EAGER_RTN = {**EAGER, "recipe": "w4a4-rtn"}


def linear_modules(model, skip=("lm_head",)):
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in skip]


@pytest.mark.slow
def test_fresh_interpreter_finds_backend_without_import(tmp_path):
    """The entry point registers `q4`: no `import qcompile` before torch.compile."""
    script = textwrap.dedent(
        """
        import importlib.util, sys, torch
        # the tiny models' file alone (it imports torch and transformers), not the qcompile package
        spec = importlib.util.spec_from_file_location("tiny_models", %r)
        tiny = sys.modules["tiny_models"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny)
        tiny_bert, tiny_llama = tiny.tiny_bert, tiny.tiny_llama
        assert "qcompile" not in sys.modules
        results = []
        for make, inputs in ((tiny_llama, torch.randint(0, 256, (1, 12))),
                             (tiny_bert, torch.randint(0, 256, (2, 9)))):
            model = make()
            linears = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
            with torch.no_grad():
                out = torch.compile(model, backend="q4", options={"progress": False})(inputs)
            import qcompile.backends.q4 as b
            art = b.compiled_graphs()[-1]
            fused = art.count_ops(torch.ops.q4.linear_w4a4.default)
            left = art.count_ops(torch.ops.aten.linear.default)
            print(type(model).__name__, linears, fused, left, bool(torch.isfinite(out[0]).all()))
            torch._dynamo.reset()
        """
    ) % str(Path(__file__).resolve().parents[2] / "qcompile" / "tools" / "tiny_models.py")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["LlamaForCausalLM", "BertModel"]
    llama, bert = lines
    # every decoder linear of Llama (2 layers x 7) and the head (8-bit activations) are fused
    assert llama[1:] == ["14", "15", "0", "True"]
    # every encoder linear of BERT (2 layers x 6) and the pooler are fused; nothing left in float
    assert bert[1:] == ["13", "13", "0", "True"]


@pytest.mark.slow
def test_user_parameters_unchanged_byte_for_byte(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    grads = {k: p.requires_grad for k, p in llama.named_parameters()}
    compile_and_run(llama, EAGER, ids(10))
    after = llama.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype
        assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    assert grads == {k: p.requires_grad for k, p in llama.named_parameters()}


def fake_quant_reference(model, calibration_ids, run_ids, skip=("lm_head",)):
    """An independent eager twin of the w4a4-rtn recipe: forward hooks replace each nn.Linear by
    kernels.reference.fake_quant_linear_ref with a per-tensor absmax step from calibration."""
    model = copy.deepcopy(model)
    absmax = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip}

    def observe(name):
        def hook(mod, inputs):
            absmax[name] = max(absmax.get(name, 0.0), inputs[0].abs().max().item())
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in linears.items()]
    with torch.no_grad():
        model(calibration_ids)
    for h in handles:
        h.remove()
    for name, m in linears.items():
        step = torch.tensor(absmax[name] / 7)
        m.forward = (lambda mod, s: lambda x: reference.fake_quant_linear_ref(x, mod.weight, mod.bias, s))(m, step)
    with torch.no_grad():
        return model(run_ids)


@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_compiled_llama_matches_fake_quant_reference(llama, lower):
    calib, run = ids(16, seed=2), ids(16, seed=3)
    expected = fake_quant_reference(llama, calib, run).logits
    _, out, art = compile_and_run(llama, {"lower": lower, "progress": False, "recipe": "w4a4-rtn",
                                          "calibration": [(calib,)]}, run)
    got = out.logits
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 14
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999, cosine
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_compiled_bert_matches_fake_quant_reference(bert):
    calib, run = ids(12, seed=4, batch=2), ids(12, seed=5, batch=2)
    expected = fake_quant_reference(bert, calib, run).last_hidden_state
    _, out, _ = compile_and_run(bert, {**EAGER, "recipe": "w4a4-rtn", "calibration": [{"input_ids": calib}]}, run)
    cosine = torch.nn.functional.cosine_similarity(out.last_hidden_state.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999, cosine


@pytest.mark.slow
def test_quantized_weights_hold_under_a_sixth_of_fp32():
    model = tiny_llama()
    fp32 = sum(model.get_submodule(n).weight.numel() * 4 for n in linear_modules(model, skip=()))
    _, _, art = compile_and_run(model, EAGER, ids(8))  # w4a4: the head is quantized too
    # 4 bits, a uint8 multiplier per 32 weights and a float32 step per row of 64 here (rows of 576
    # and more on SmolLM2): 4.75 bits a weight, fp32 / 6.7
    assert art.quantized_weight_bytes() * 6.5 <= fp32
    # no fp32 copy of a quantized weight is held by the compiled graph
    held = {name for name, _ in art.graph_module.named_buffers()}
    for name in linear_modules(model):
        assert not any(h.startswith(name.replace(".", "_") + "_weight")
                       and not any(part in h for part in ("packed", "step", "mult")) for h in held), name
    # the group multipliers are counted: a uint8 per 32 weights of every grouped linear
    mult = [b for h, b in art.graph_module.named_buffers() if h.endswith("_mult")]
    assert mult and all(b.dtype == torch.uint8 for b in mult)
    assert art.quantized_weight_bytes() >= sum(b.numel() for b in mult) + sum(
        b.numel() for h, b in art.graph_module.named_buffers() if h.endswith("_packed"))


@pytest.mark.slow
def test_recompile_for_new_length_reuses_calibration(llama, monkeypatch):
    from qcompile.frontend import calibrate

    calls = []
    real_observe = calibrate.observe_model
    monkeypatch.setattr(calibrate, "observe_model", lambda *a, **k: calls.append(1) or real_observe(*a, **k))
    compiled = torch.compile(llama, backend="q4", options={**EAGER, "calibration": [(ids(16),), (ids(16, 7),)]})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # calibration data given: no first-call warning
        compiled(ids(8))
        compiled(ids(13))
        compiled(ids(21))
    assert len(calls) == 1
    assert len({a.graph_id for a in q4_backend.compiled_graphs()[-2:]}) == 2  # it did recompile


@pytest.mark.slow
def test_first_call_calibration_warns_once(llama):
    compiled = torch.compile(llama, backend="q4", options=EAGER)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(ids(8))
        compiled(ids(11))
    messages = [str(w.message) for w in caught if "calibrat" in str(w.message)]
    assert len(messages) == 1 and "first call" in messages[0]


@pytest.mark.slow
def test_positional_and_keyword_batches_both_bind(llama):
    for batch in ((ids(8),), {"input_ids": ids(8)}):
        torch._dynamo.reset()
        _, out, _ = compile_and_run(copy.deepcopy(llama), {**EAGER, "calibration": [batch]}, input_ids=ids(8, 3))
        assert torch.isfinite(out.logits).all()


# --- bad input ---------------------------------------------------------------------------------


def compile_error(model, options, *args) -> str:
    with pytest.raises(Exception) as info:
        compile_and_run(model, options, *args)
    return str(info.value)


def test_nan_calibration_batch_names_the_batch():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    message = compile_error(model, {**EAGER, "calibration": [(x,), (x * float("nan"),)]}, x)
    assert "calibration batch 1" in message and "NaN" in message


def test_model_error_on_a_batch_names_the_batch(llama):
    batches = [{"input_ids": ids(8)}, {"input_ids": ids(8).float()}]
    message = compile_error(llama, {**EAGER, "calibration": batches}, ids(8))
    assert "calibration batch 1" in message and "the model raised" in message


def test_empty_calibration_is_an_error(llama):
    assert "empty" in compile_error(llama, {**EAGER, "calibration": []}, ids(8))


def test_batch_that_does_not_fit_the_signature(llama):
    message = compile_error(llama, {**EAGER, "calibration": [{"tokens": ids(8)}]}, ids(8))
    assert "calibration batch 0" in message and "tokens" in message


def test_batch_of_wrong_type(llama):
    assert "calibration batch 0 is a str" in compile_error(llama, {**EAGER, "calibration": ["hello"]}, ids(8))


def test_model_without_linear_layers_compiles_and_runs():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU())
    x = torch.randn(3, 8)
    _, out, art = compile_and_run(model, EAGER, x)
    torch.testing.assert_close(out, model(x))
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 0


@pytest.mark.parametrize("options,form", [({}, "weight-only int4"), ({"disable": "fuse-kernels"}, "weight-only int4"),
                                          ({"recipe": "w4a4-rtn"}, "fused int4")])
def test_migration_report_says_how_each_linear_runs(options, form):
    """A weight-only linear, fused (q4.linear_w4a16) or not, was reported as fake-quant (found by tests/fuzz)."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(2, 3, 32)
    _, _, art = compile_and_run(model, {**EAGER, "recipe": "w4a16", "calibration": [(x,)], **options}, x)
    rows = art.migration_report().splitlines()[2:]
    assert len(rows) == 2 and all(row.split()[1:3] == form.split() for row in rows), rows


def test_unknown_option_key_lists_valid_ones(llama):
    message = compile_error(llama, {"recipes": "w4a4-rtn"}, ids(8))
    assert "recipes" in message and "recipe" in message and "calibration" in message


def test_unknown_recipe_lists_known_ones(llama):
    assert "w4a4-rtn" in compile_error(llama, {**EAGER, "recipe": "w3a3"}, ids(8))


def test_malformed_pipeline_is_an_error(llama):
    message = compile_error(llama, {**EAGER, "pipeline": "insert-quantizers{w-bits=4"}, ids(8))
    assert "insert-quantizers{w-bits=4" in message


def test_unknown_pass_option_value_lists_valid_values(llama):
    message = compile_error(llama, {**EAGER, "pipeline": "insert-quantizers{w-bits=5}"}, ids(8))
    assert "w-bits" in message and "2, 3, 4" in message


def test_unhandled_ops_stay_in_float_and_are_counted():
    class WithBmm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.table = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return self.proj(x) @ self.table  # a matmul against a parameter: not a linear

    model = WithBmm().eval()
    x = torch.randn(2, 8)
    _, out, art = compile_and_run(model, EAGER, x)
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 1
    assert art.count_ops(torch.ops.aten.matmul.default) == 1
    stats = {}
    for r in art.records:  # the first insert-quantizers run: the default recipe's main one (the head's is last)
        stats.setdefault(r.name, r.stats)
    assert stats["insert-quantizers"]["linears-quantized"] == 1
    assert stats["insert-quantizers"]["unhandled-ops-in-float"] == 1


# --- instrumentation through the backend ------------------------------------------------------


def test_print_after_all_and_dump_dir(llama, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("Q4_PRINT_AFTER_ALL", "1")
    monkeypatch.setenv("Q4_DUMP_DIR", str(tmp_path))
    compile_and_run(llama, EAGER_RTN, ids(8))
    err = capfd.readouterr().err
    assert "IR Dump After insert-quantizers" in err and "IR Dump After fuse-kernels" in err
    (graph_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in graph_dir.iterdir()) == [
        "000-capture.txt", "001-normalize.txt", "002-freeze.txt", "003-analyze-outliers.txt",
        "004-fold-scales.txt", "005-insert-quantizers.txt", "006-fuse-kernels.txt",
    ]
    assert "linear W4A4 int(" in (graph_dir / "006-fuse-kernels.txt").read_text()


def test_disable_drops_a_pass(llama, monkeypatch):
    monkeypatch.setenv("Q4_DISABLE", "fuse-kernels")
    _, _, art = compile_and_run(llama, EAGER_RTN, ids(8))
    assert art.pipeline == "analyze-outliers,fold-scales,insert-quantizers{w-bits=4,a-bits=4}"
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 0
    assert art.count_ops(torch.ops.q4.dequantize_weight_int4.default) == 14


def test_failing_pass_names_pass_node_and_reproducer(llama, monkeypatch):
    from qcompile.kernels import int4

    def broken(*args, **kwargs):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(int4, "quantize_weight_per_channel", broken)
    message = compile_error(llama, EAGER_RTN, ids(8))
    assert "insert-quantizers" in message and "synthetic failure" in message
    assert "modeling_llama.py" in message  # the node's source line
    assert "Q4_PIPELINE='analyze-outliers,fold-scales,insert-quantizers{w-bits=4,a-bits=4}'" in message
    assert "after passes: analyze-outliers, fold-scales" in message


def test_compiled_graph_reports_outliers(llama):
    _, _, art = compile_and_run(llama, EAGER, ids(8))
    report = art.outlier_report()
    assert len(report.splitlines()) == 2 + 15  # header, rule, one row per linear (the float lm_head too)
    assert "model.layers.0.self_attn.q_proj" in report


def test_tied_lm_head_skipped_by_module_path_stays_in_float():
    """SmolLM2 ties lm_head to the embedding: Dynamo names the shared weight after the embedding,
    yet `skip=lm_head` (w4a4-rtn's default) must match the head by its module and keep it float."""
    model = tiny_llama(tie_word_embeddings=True)
    _, _, art = compile_and_run(model, EAGER_RTN, ids(8))
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 14
    assert art.count_ops(torch.ops.aten.linear.default) == 1


def test_smoothquant_recipe_runs_end_to_end(llama):
    calib = ids(16, seed=2)
    _, out, art = compile_and_run(llama, {**EAGER, "recipe": "w4a4-smoothquant", "calibration": [(calib,)]}, ids(16))
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 14
    stats = {r.name: r.stats for r in art.records}
    assert stats["migrate-scales"]["linears-migrated"] == 14  # every linear but the head
    assert torch.isfinite(out.logits).all()


# (W4A4 / W4A8 fused linears, weight-only fused linears): w4a4 quantizes the head too (8-bit activations)
@pytest.mark.slow
@pytest.mark.parametrize("recipe,fused,weight_only", [("w4a4", 15, 0), ("w4a8", 14, 0), ("w4a16", 0, 14),
                                                      ("fp4", 15, 0), ("fp4-e2m1", 15, 0), ("w4a4-dynamic", 15, 0)])
def test_every_recipe_runs_end_to_end(llama, recipe, fused, weight_only):
    run = ids(12, seed=9)
    expected = llama(run).logits
    _, out, art = compile_and_run(llama, {**EAGER, "recipe": recipe, "calibration": [(ids(16, seed=2),)]}, run)
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == fused
    assert art.count_ops(torch.ops.q4.linear_w4a16.default) == weight_only
    assert art.count_ops(torch.ops.q4.dequantize_weight_int4.default) == 0
    if recipe.startswith("fp4"):  # every linear but the head (int8 activations) has a 4-bit float weight and input
        linears = [q for n in art.graph_module.graph.nodes if (q := qlinear.match(n)) is not None and q.fused]
        assert sum(q.w_format in formats.FLOAT_FORMATS and q.a_format in formats.FLOAT_FORMATS for q in linears) == 14
    if recipe == "w4a4-dynamic":  # every activation step is computed per token at run time
        assert art.count_ops(torch.ops.q4.token_steps.default) == art.count_ops(torch.ops.q4.quantize_per_tensor.default)
    cosine = torch.nn.functional.cosine_similarity(out.logits.flatten(), expected.flatten(), dim=0)
    assert cosine > (0.9 if recipe != "w4a4" else 0.5), cosine


@pytest.mark.slow
def test_fp4_through_inductor_matches_its_fake_quant_reference(llama):
    """The FP4 recipe's fused integer kernels, lowered through Inductor (the q4_cpu kernel at 12
    rows), compute its fake-quant graph: the same pipeline without fuse-kernels, run eagerly."""
    calibration, run = [(ids(16, seed=2),)], ids(12, seed=9)
    pipeline = RECIPES["fp4-e2m1"]
    _, fused, art = compile_and_run(llama, {"recipe": "fp4-e2m1", "progress": False, "calibration": calibration}, run)
    torch._dynamo.reset()
    _, fake, fake_art = compile_and_run(llama, {**EAGER, "pipeline": pipeline.replace(",fuse-kernels", ""),
                                                "calibration": calibration}, run)
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 15
    assert fake_art.count_ops(torch.ops.q4.linear_w4a4.default) == 0
    cosine = torch.nn.functional.cosine_similarity(fused.logits.flatten(), fake.logits.flatten(), dim=0)
    assert cosine > 0.9999, cosine


def test_two_models_of_one_class_each_run_their_own_weights():
    """Dynamo shares one compiled forward between instances of a class, passing each one's
    parameters as inputs; q4 freezes them, so the second model must get a graph of its own
    (it once ran the first model's weights)."""
    first, second = tiny_llama(seed=0), tiny_llama(seed=1)
    x = ids(10)
    options = {**EAGER, "recipe": "w4a4-rtn", "rounding": False, "calibration": [(x,)]}
    torch._dynamo.reset()
    with torch.no_grad(), pytest.warns(UserWarning, match="serves several module instances"):
        got = [torch.compile(m, backend="q4", options=options)(x, use_cache=False).logits for m in (first, second)]
    with torch.no_grad():
        expected = [m(x, use_cache=False).logits for m in (first, second)]
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()


def test_a_parameter_changed_in_place_after_compiling_is_an_error():
    """The quantized graph holds the weight it was compiled from: a later in-place change would
    be silently ignored, so the next call says so (and what to do) instead."""
    model, x = tiny_llama(), ids(8)
    compiled = torch.compile(model, backend="q4", options={**EAGER_RTN, "calibration": [(x,)]})
    with torch.no_grad():
        compiled(x, use_cache=False)
        model.model.layers[1].self_attn.o_proj.weight.mul_(2)
        with pytest.raises(RuntimeError, match=r"parameter 'model.layers.1.self_attn.o_proj.weight' was changed "
                                               r"in place after graph .* quantized it.*Quantize the changed model again"):
            compiled(x, use_cache=False)


@pytest.mark.parametrize("given, lowered_with", [({}, "default"), ({"mode": "max-autotune"}, "max-autotune")])
def test_the_mode_option_reaches_the_lowering(llama, monkeypatch, given, lowered_with):
    """`torch.compile` refuses `mode` beside `options`: q4's options carry Inductor's mode."""
    modes = []
    lower = q4_backend.lower
    monkeypatch.setattr(q4_backend, "lower", lambda gm, inputs, how, kernels, mode: modes.append(mode) or
                        lower(gm, inputs, how, kernels, mode))
    compile_and_run(llama, {**EAGER, "recipe": "w4a4-rtn", "calibration": [(ids(16, seed=2),)], **given}, ids(8))
    assert modes == [lowered_with]
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="'fast' is not one of: default, reduce-overhead"):
        compile_and_run(llama, {**EAGER, "mode": "fast"}, ids(8))
