"""The bad-input catalogue: what a user gives q4 that is wrong or unusual, and what they see.

Each entry runs through the public door (`torch.compile(model, backend="q4", options=...)`,
then the call) and checks the text the user reads: an error naming the problem, a warning, or
a model that runs correctly. After every entry the user's model is unchanged byte for byte.
`docs/bad-inputs.md` is this catalogue as a table; `test_the_docs_table_is_this_catalogue`
keeps them the same.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qcompile.backends import q4 as q4_backend
from tests.helpers.models import ids, tiny_llama

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
QUIET = {"progress": False, "lower": "eager", "recipe": "w4a4-rtn"}


@dataclasses.dataclass(frozen=True)
class Entry:
    given: str  # what the user does
    sees: str  # what they read (part of the message), or how it runs
    run: Callable[[], tuple[torch.nn.Module, str]]  # -> (the user's model, the text they saw)


CATALOGUE: list[Entry] = []


def entry(given: str, sees: str):
    def register(run):
        CATALOGUE.append(Entry(given, sees, run))
        return run
    return register


class _Mlp(torch.nn.Module):
    def __init__(self, blow_up: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)
        self.blow_up = blow_up

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) * self.blow_up)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))


def _error(model, options: dict, *args, **kwargs) -> str:
    """The message of the error compiling and calling `model` raises (Dynamo wraps the backend's)."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend="q4", options=options)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return str(e)
    raise AssertionError("no error")


def _close(got: torch.Tensor, expected: torch.Tensor, cosine: float = 0.95) -> bool:
    return torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(), dim=0) > cosine


@entry("NaN or inf in a calibration batch", "calibration batch 1: argument 0 holds NaN or inf")
def _nan_in_batch():
    model = _Mlp()
    return model, _error(model, {**QUIET, "calibration": [(_x(),), (_x() * float("nan"),)]}, _x())


@entry("a calibration batch on which the model overflows to inf inside",
       "calibration batch 0: non-finite activation reaches the linear of 'down.weight'")
def _inf_inside():
    model = _Mlp(blow_up=float("inf"))
    return model, _error(model, {**QUIET, "calibration": [(_x(),)]}, _x())


@entry("empty calibration", "the calibration iterable is empty: give at least one batch")
def _empty():
    model = _Mlp()
    return model, _error(model, {**QUIET, "calibration": []}, _x())


@entry("a calibration iterator already consumed", "(the calibration object is an iterator that was already consumed: "
       "pass a list so recompiles can reuse it)")
def _consumed():
    model, batches = _Mlp(), iter([(_x(),)])
    list(batches)
    return model, _error(model, {**QUIET, "calibration": batches}, _x())


@entry("a calibration batch that does not fit the model", "calibration batch 0 does not fit the model's signature "
       "_Mlp.forward(x)")
def _misfit():
    model = _Mlp()
    return model, _error(model, {**QUIET, "calibration": [{"y": _x()}]}, _x())


@entry("a misnamed keyword in a calibration batch, to a forward taking **kwargs",
       "calibration batch 0: the model raised ValueError: You must specify exactly one of input_ids or inputs_embeds "
       "(note: 'tokens' is not a named argument of LlamaForCausalLM.forward)")
def _misnamed():
    model = tiny_llama()
    return model, _error(model, {**QUIET, "calibration": [{"tokens": ids(8)}]}, ids(8))


@entry("a calibration batch of the wrong type", "calibration batch 0 is a str; expected a dict of keyword arguments "
       "or a tuple of positional arguments of the model")
def _wrong_batch_type():
    model = _Mlp()
    return model, _error(model, {**QUIET, "calibration": ["hello"]}, _x())


@entry("a pipeline with a misspelt pass", "unknown pass 'insert-quantiser' (did you mean 'insert-quantizers'?)")
def _pass_typo():
    model = _Mlp()
    return model, _error(model, {**QUIET, "pipeline": "insert-quantiser{w-bits=4}"}, _x())


@entry("a misspelt pass option", "pass 'insert-quantizers' has no option 'w-bitz' (did you mean 'w-bits'?)")
def _option_typo():
    model = _Mlp()
    return model, _error(model, {**QUIET, "pipeline": "insert-quantizers{w-bitz=4}"}, _x())


@entry("a misspelt option key", "unknown q4 option 'recipes' (did you mean 'recipe'?)")
def _key_typo():
    model = _Mlp()
    return model, _error(model, {"recipes": "w4a4"}, _x())


@entry("an option of the wrong type", "option 'progress': expected bool, got str 'yes'")
def _wrong_option_type():
    model = _Mlp()
    return model, _error(model, {**QUIET, "progress": "yes"}, _x())


@entry("a float64 model", "runs; its linears stay float64, each saying 'its weight is float64: the q4 kernels take "
       "float32, float16, bfloat16'")
def _float64():
    model = _Mlp().double()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="q4", options={**QUIET, "calibration": [(_x().double(),)]})(_x(1).double())
        assert torch.allclose(got, model(_x(1).double()))
    return model, "runs; its linears stay float64, each saying " + repr(
        q4_backend.compiled_graphs()[-1].graph_module.graph.find_nodes(
            op="call_function", target=torch.ops.aten.linear.default)[0].meta["q4_float_reason"])


@entry("a model with no linear layers", "runs, the model's own function")
def _no_linears():
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.GELU())
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="q4", options={**QUIET, "calibration": [(_x(),)]})(_x(1))
    assert torch.equal(got, model(_x(1)))
    return model, "runs, the model's own function"


@entry("a model with graph breaks (a print, a branch on a tensor's value) and calibration batches",
       "runs quantized: one calibration run of the model gives every graph its statistics")
def _graph_breaks():
    class Broken(_Mlp):
        def forward(self, x):
            h = torch.relu(self.up(x))
            if h.amax() > 1e4:  # a graph break
                h = h.clamp(max=1e4)
            print("", end="")  # another
            return self.down(h)

    model = Broken()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="q4", options={**QUIET, "calibration": [(_x(),), (_x(2),)]})(_x(1))
    graphs = q4_backend.compiled_graphs()[-2:]
    assert sum(g.count_ops(torch.ops.q4.linear_w4a4.default) for g in graphs) == 2 and _close(got, model(_x(1)))
    return model, "runs quantized: one calibration run of the model gives every graph its statistics"


@entry("two models of one class compiled in one process",
       "each runs its own weights (a warning says graph N serves several module instances)")
def _two_models():
    first, second = tiny_llama(seed=0), tiny_llama(seed=1)
    torch._dynamo.reset()
    options = {**QUIET, "rounding": False, "calibration": [(ids(8),)]}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [torch.compile(m, backend="q4", options=options)(ids(8), use_cache=False).logits for m in (first, second)]
        for out, m in zip(outs, (first, second)):
            torch.testing.assert_close(out, m(ids(8), use_cache=False).logits, rtol=1e-4, atol=1e-4)
    said = next(str(w.message) for w in caught if "qcompile" in str(w.message))
    assert "serves several module instances" in said
    return second, "each runs its own weights (a warning says graph N serves several module instances)"


@entry("a parameter changed in place after compiling", "parameter 'up.weight' was changed in place after graph")
def _changed_in_place():
    model = _Mlp()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="q4", options={**QUIET, "calibration": [(_x(),)]})
    with torch.no_grad():
        compiled(_x())
        original = model.up.weight.clone()
        model.up.weight.mul_(2)
        try:
            compiled(_x())
            message = "no error"
        except RuntimeError as e:
            message = str(e)
        model.up.weight.copy_(original)  # as it was: the check below compares with the original
    return model, message


@entry("a call far outside the calibrated range (inputs 50x larger than the calibration batches)",
       "a warning, once (the outputs those of the quantized model, as with the check off): qcompile: a call to graph N "
       "went far outside the activation range calibrated for 2 quantized linear input(s): up (50.0x)")
def _far_outside():
    model = _Mlp()
    torch._dynamo.reset()
    options = {**QUIET, "calibration": [(_x(),)]}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="q4", options=options)
        usual = compiled(_x())
        far = [compiled(_x() * 50) for _ in range(3)]
        said = [str(w.message) for w in caught if "far outside" in str(w.message)]
        assert len(said) == 1 and torch.equal(compiled(_x()), usual)  # once; the usual calls unchanged
        # still correct: what the quantized model computes, the same with the check off
        torch._dynamo.reset()
        unchecked = torch.compile(model, backend="q4", options={**options, "range_warning": False})
        assert unchecked(_x()).equal(usual) and all(unchecked(_x() * 50).equal(f) for f in far)
    graph_id = said[0].split(" went")[0].split("graph ")[-1]
    return model, ("a warning, once (the outputs those of the quantized model, as with the check off): "
                   + said[0].replace(f"graph {graph_id} ", "graph N ", 1))


@entry("two threads calling one compiled model", "each gets what one thread gets")
def _threads():
    model = tiny_llama()
    inputs = [ids(9, seed=s) for s in range(4)]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="q4", options={**QUIET, "calibration": [(inputs[0],)]})
    with torch.no_grad():
        expected = [compiled(x, use_cache=False).logits for x in inputs]
    got = {}

    def run(indices):
        with torch.no_grad():
            for i in indices:
                got[i] = compiled(inputs[i], use_cache=False).logits

    threads = [threading.Thread(target=run, args=(range(k, 4, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], expected[i]) for i in range(4))
    return model, "each gets what one thread gets"


@entry("Ctrl-C during calibration", "KeyboardInterrupt; nothing written, the model untouched")
def _interrupted():
    from qcompile import quantize
    from qcompile.frontend import calibrate

    model = _Mlp()
    real = calibrate.observe_model

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    calibrate.observe_model = interrupt
    torch._dynamo.reset()
    try:
        quantize(model, [(_x(),)], recipe="w4a4-rtn", lower="eager")
        message = "no interrupt"
    except KeyboardInterrupt:
        message = "KeyboardInterrupt; nothing written, the model untouched"
    finally:
        calibrate.observe_model = real
    return model, message


@pytest.mark.parametrize("item", CATALOGUE, ids=lambda e: e.given)
def test_bad_input(item: Entry):
    model, seen = item.run()
    assert item.sees in seen, seen
    original, after = _rebuild(item).state_dict(), model.state_dict()
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original), "the user's model changed"


def _rebuild(item: Entry) -> torch.nn.Module:
    """The entry's model as it was built, before anything ran on it (the builders are seeded)."""
    builders = {
        "_float64": lambda: _Mlp().double(), "_no_linears": lambda: torch.nn.Sequential(
            torch.nn.LayerNorm(16), torch.nn.GELU()), "_misnamed": tiny_llama, "_threads": tiny_llama,
        "_two_models": lambda: tiny_llama(seed=1), "_inf_inside": lambda: _Mlp(float("inf")),
    }
    return builders.get(item.run.__name__, _Mlp)()


def test_the_docs_table_is_this_catalogue():
    rows = [f"| {e.given} | {e.sees} |" for e in CATALOGUE]
    text = DOCS.read_text(encoding="utf-8")
    missing = [row for row in rows if row not in text]
    assert not missing, "docs/bad-inputs.md lacks:\n" + "\n".join(missing)
