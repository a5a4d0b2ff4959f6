"""generate() on the real SmolLM2-135M, in every form users write it, with w4a4, w4a8 and w4a16.

What must hold (issue 13): greedy generation through the KV cache, dynamic or static, gives the
tokens the compiled model's own no-cache logits pick at every step (the cache holds the model's
own values: o_proj's migration is a multiply of its own, not folded into v_proj's rows); a
left-padded batch gives each row the tokens it gets alone; a long generation over many prompt
lengths compiles a bounded number of graphs and calibrates once.

w4a8 is checked on an unpadded prompt. Its logits move by 0.6-3.7 when the input embeddings move
by one part in a million (w4a4's do not move; measured on a 13-token prompt, eager lowering): an
8-bit code step is small enough that float rounding flips codes, and each flip cascades. In a
left-padded batch the attention of a padded row rounds differently at another sequence length
(the no-cache reference is longer than the prompt), so its logits differ from generate()'s by
that much at every step; the unpadded row's agree exactly.

Lowered through Inductor on CPU, a w4a4 model computes each row the same way at any sequence
length (q4_cpu's attention and Walsh-Hadamard transform; the integer GEMMs are exact), so the
perplexity through a static cache is the no-cache one bit for bit, on 256 tokens.

Cost: each SmolLM2 graph takes about a minute to compile through Inductor on 2 cores, and w4a4's
GPTQ about as long (its rotations are learned in a few steps here, not 120: the same passes, learned
factors and kernels, see tests/helpers/recipes.py) (once per recipe and calibration:
`CalibrationCache` shares it between the graphs). Every test here calibrates on the module's one
`calibration` object (`qcompile.quantize` included: it hands the backend the list it is given), so
each recipe learns and runs GPTQ once in the module, whichever test compiles it first. The w4a4
64-token check runs Inductor's lowering, as users get it; the other tests lower with `lower="eager"`
(the same graphs and ops, run op by op, in a third of the time). The same check lowered eagerly
fails: the eager rotation (one GEMM per factor) rounds differently at the decode step's rows than in
the longer no-cache call, and a flipped code cascades (measured at ef1c036; see the w4a8 note
above).
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

import qcompile
from qcompile.backends.q4 import Q4Backend
from qcompile.tools import zoo
from tests.helpers.backend import counting_backend
from tests.helpers.recipes import quick

pytestmark = pytest.mark.model

PROMPTS = ("It is a truth universally acknowledged, that a single man",
           "Elizabeth was",
           "Mr. Darcy walked towards",
           "The weather at Netherfield had been")


# calls of `calibrate._observe` on the module's `calibration` (the fixture counts them), module-wide
OBSERVED: list[bool] = []


@pytest.fixture(scope="module")
def calibration(smollm2):
    """Two 256-token windows of Emma: one object for the whole module, so every compile of one
    recipe finds the GPTQ and learned-rotation results of the first, and every compile the
    statistics of the first (w4a4, w4a8 and w4a16 read the same ones, Gram matrices included).
    While the module runs, each observation of these batches (a calibration run) is counted in
    `OBSERVED`: the many-prompt-lengths test checks there was one in the whole module, whichever
    test compiled first."""
    from qcompile.frontend import calibrate

    _, tokenizer = smollm2
    batches = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 512, 256)]
    observe = calibrate._observe
    options = inspect.signature(observe)

    def counted(*args, **kwargs):
        if options.bind(*args, **kwargs).arguments["opts"].calibration is batches:
            OBSERVED.append(True)
        return observe(*args, **kwargs)

    OBSERVED.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibrate, "_observe", counted)
        yield batches


@pytest.fixture(scope="module")
def prompts(smollm2) -> dict:
    """The four prompts, left-padded to one batch (what generate() wants for a decoder). The
    session's tokenizer is shared: its padding side is put back."""
    _, tokenizer = smollm2
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(tokenizer(list(PROMPTS), return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side


def recipe(name: str) -> dict:
    """The options of a recipe: w4a4's pipeline with its rotations learned in a few steps (the
    same passes, learned factors and kernels; tests/helpers/recipes.py), the others as they are."""
    return {"pipeline": quick(name)} if name == "w4a4" else {"recipe": name}


def q4(**options) -> tuple[Q4Backend, list]:
    """The q4 backend with these options (no progress bars) and the list of the graphs it compiles."""
    return counting_backend({"progress": False, **options})


@contextlib.contextmanager
def compiled_forward(model: torch.nn.Module, **options):
    """The documented form, `model.forward = torch.compile(model.forward, backend="q4", ...)`,
    undone afterwards (the session's model is shared); yields the list of compiled graphs."""
    backend, graphs = q4(**options)
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        yield graphs
    finally:
        del model.forward  # the class's forward again


def greedy(generate, batch: dict, new_tokens: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=0, **kwargs)


def no_cache_argmax(model: torch.nn.Module, batch: dict, sequences: torch.Tensor) -> torch.Tensor:
    """The token the model's own no-cache logits pick at each generated position, as greedy()
    picks it: `min_new_tokens` makes generate() mask the end-of-sequence tokens at every step
    (with learned rotations SmolLM2 wants to end some of these prompts within 64 tokens). The
    positions are generate()'s: counted from each row's first real token (left padding shifts them)."""
    prompt = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, prompt:])], 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logits = logits[:, prompt - 1:-1]
    logits[..., end_of_sequence_ids(model)] = -float("inf")
    return logits.argmax(-1)


def end_of_sequence_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def all_quantized(graphs: list) -> bool:
    return bool(graphs) and all(g.count_ops(torch.ops.q4.linear_w4a4) + g.count_ops(torch.ops.q4.linear_w4a16) > 0
                                for g in graphs)


@pytest.mark.parametrize(("name", "new_tokens", "lower", "padded"), [
    ("w4a4", 64, "inductor", True),
    ("w4a8", 8, "eager", False),
    ("w4a16", 8, "eager", True),
])
def test_greedy_generation_through_the_cache_is_the_no_cache_argmax(smollm2, calibration, prompts, name,
                                                                       new_tokens, lower, padded):
    """4 left-padded prompts (w4a8: the first alone, see the module docstring), the default
    dynamic cache and (lowered eagerly) a static one: every new token is the argmax of the
    compiled model's own no-cache logits at its position."""
    model, tokenizer = smollm2
    batch = prompts if padded else dict(tokenizer(list(PROMPTS[:1]), return_tensors="pt"))
    with compiled_forward(model, **recipe(name), calibration=calibration, lower=lower) as graphs:
        dynamic = greedy(model.generate, batch, new_tokens)
        expected = no_cache_argmax(model, batch, dynamic)
        # Inductor compiles each graph in about a minute: the static cache's (two more) once, in
        # the perplexity test below, which checks it token by token
        static = greedy(model.generate, batch, new_tokens, cache_implementation="static") if lower == "eager" else dynamic
    assert all_quantized(graphs)
    prompt = batch["input_ids"].shape[1]
    assert torch.equal(dynamic[:, prompt:], expected)
    assert torch.equal(static, dynamic)


def test_perplexity_through_the_static_cache_is_the_no_cache_perplexity(smollm2, calibration):
    """256 tokens of Pride and Prejudice, w4a4 lowered through Inductor: each token's negative
    log-likelihood, computed one token at a time through a static KV cache, is the no-cache
    forward's, bit for bit (issue 13 asks the perplexities within 0.5%; before q4_cpu's attention
    and the Walsh-Hadamard transform at every M they were 0.68% apart, on 2048 tokens; 256 since
    the test took 348 s at 2048 and 679 s at 1024 in a worker of one thread, and 393 s at 512 in a
    contended CI run, each step reading a cache of the whole length: every step is still compared)."""
    from transformers import StaticCache

    model, tokenizer = smollm2
    ids = zoo.token_windows(tokenizer, "pride_and_prejudice", 256, 256)[0]
    targets = ids[0, 1:]
    with compiled_forward(model, **recipe("w4a4"), calibration=calibration) as graphs, torch.no_grad():
        no_cache = torch.nn.functional.cross_entropy(model(input_ids=ids, use_cache=False).logits[0, :-1], targets,
                                                     reduction="none")
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1])
        through_cache = torch.stack([
            torch.nn.functional.cross_entropy(
                model(input_ids=ids[:, i:i + 1], past_key_values=cache, cache_position=torch.tensor([i])).logits[0],
                targets[i:i + 1])
            for i in range(len(targets))])
    assert all_quantized(graphs)
    assert torch.equal(through_cache, no_cache), (through_cache.mean().exp(), no_cache.mean().exp())


def test_left_padded_rows_get_the_tokens_they_get_alone(smollm2, calibration, prompts):
    model, tokenizer = smollm2
    with compiled_forward(model, **recipe("w4a4"), calibration=calibration, lower="eager") as graphs:
        batched = greedy(model.generate, prompts, 8)
        for row, text in enumerate(PROMPTS):
            alone = greedy(model.generate, dict(tokenizer([text], return_tensors="pt")), 8)
            assert torch.equal(batched[row, -8:], alone[0, -8:]), text
    assert all_quantized(graphs)


def test_generation_over_many_prompt_lengths_compiles_a_bounded_number_of_graphs_and_calibrates_once(
        smollm2, calibration):
    """Prompts of 8 to 512 tokens and a 256-token generation: a prompt graph and decode graphs
    that generalize (Dynamo's automatic dynamic shapes), not one per length or token; the
    calibration batches are observed once: by this test's first graph if it is the first to
    compile in the module, else by an earlier test's, and by none of this test's graphs. (The
    module's calibration, not a fresh one: a fresh object would make its first graph learn the
    rotations and run GPTQ again for the same claim; the passes of a first w4a4 graph took 368 s
    against 13 s for a graph that finds their results, one measurement on a loaded 2-core machine.)"""
    model, tokenizer = smollm2
    text = zoo.text("emma")
    with compiled_forward(model, **recipe("w4a4"), calibration=calibration, lower="eager") as graphs:
        for length in (8, 24, 100, 333, 512):
            ids = tokenizer(text[2000:6000], return_tensors="pt").input_ids[:, :length]
            greedy(model.generate, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4)
        ids = tokenizer(text[:200], return_tensors="pt").input_ids[:, :16]
        out = greedy(model.generate, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 256)
    assert all_quantized(graphs)
    assert out.shape[1] == 16 + 256
    assert len(OBSERVED) == 1  # in the whole module so far (see `calibration`)
    # the first prompt and decode step (static shapes), then each generalized: 4 to 6 graphs
    assert len(graphs) <= 6, [g.graph_id for g in graphs]


def test_torch_compile_of_the_module_generates_quantized(smollm2, calibration, prompts):
    """The trap: `torch.compile(model, backend="q4").generate(...)` quantizes (torch alone would
    hand generate() to the uncompiled original and run FP32), with the documented form's tokens."""
    model, _ = smollm2
    options = {"recipe": "w4a8", "calibration": calibration, "lower": "eager"}
    backend, graphs = q4(**options)
    tokens = greedy(torch.compile(model, backend=backend).generate, prompts, 4)
    assert all_quantized(graphs) and len(graphs) >= 2  # the prompt and the decode steps
    assert "forward" not in model.__dict__  # the original's forward is its own again
    torch._dynamo.reset()
    with compiled_forward(model, **options):
        assert torch.equal(greedy(model.generate, prompts, 4), tokens)


def test_transformers_compile_hook_compiles_the_decode_steps_with_q4(smollm2, calibration, prompts):
    """`generation_config.compile_config` with the q4 backend: transformers compiles the decode
    steps itself (static cache; on CPU only when `_compile_all_devices` is set) and runs the prompt
    uncompiled, in float, so the first new token is the float model's."""
    from transformers import CompileConfig

    model, _ = smollm2
    backend, graphs = q4(recipe="w4a16", calibration=calibration, lower="eager")
    config = CompileConfig(backend=backend, mode=None, fullgraph=False)
    config._compile_all_devices = True
    saved = model.generation_config.compile_config
    model.generation_config.compile_config = config
    try:
        tokens = greedy(model.generate, prompts, 4, cache_implementation="static")
    finally:
        model.generation_config.compile_config = saved
    assert all_quantized(graphs)
    float_tokens = greedy(model.generate, prompts, 1)
    assert torch.equal(tokens[:, :-3], float_tokens)


def test_quantized_and_loaded_models_generate(smollm2, calibration, prompts, tmp_path):
    """`qcompile.quantize(...)` and `qcompile.load(...)` models generate, the loaded one the
    same tokens as the one saved."""
    model, _ = smollm2
    quantized = qcompile.quantize(model, calibration, **recipe("w4a4"), progress=False, lower="eager")
    tokens = greedy(quantized.generate, prompts, 4)
    quantized.save(tmp_path / "w4a4")
    torch._dynamo.reset()
    loaded = qcompile.load(model, tmp_path / "w4a4", lower="eager")
    assert torch.equal(greedy(loaded.generate, prompts, 4), tokens)
    assert all(g.count_ops(torch.ops.q4.linear_w4a4) > 0 for g in loaded.graphs)
