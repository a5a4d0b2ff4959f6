"""Artifacts: quantize -> save -> load gives the same model to the bit, with no calibration, even
where the replayed float steps give other last bits (another machine); every way an artifact can
be wrong is a clear `ArtifactError`, never a model with garbage weights.

Tiny random Llamas, eager lowering (the Inductor path is the SmolLM2 test's,
tests/examples/test_artifact_smollm2.py, which also loads in a new process)."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx

import qcompile
from qcompile.algorithms import gptq, learn_rotation, scale_search, split_channels
from qcompile.api.artifact import ArtifactError
from qcompile.core import ir
from qcompile.core.memo import Memo
from qcompile.core.pass_manager import PassManager
from qcompile.frontend import calibrate, saved_artifact
from tests.helpers.models import tiny_llama

OPTIONS = {"progress": False, "lower": "eager"}
GENERATE = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0,
            "return_dict_in_generate": True, "output_scores": True}


def _calibration(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, 24), generator=g)} for _ in range(2)]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _generate(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Greedy tokens and every step's scores: the prompt's graph, then decode graphs."""
    with torch.no_grad():
        out = model.generate(ids, **GENERATE)
    return (out.sequences, *out.scores)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama quantized with the default recipe (GPTQ + clipping search + learned rotations:
    memoized results), its artifact directory, and the quantized logits for two prompt lengths:
    19, compiled before saving (the artifact holds its graph and that of quantize()'s first call),
    and 7, whose graph is compiled after saving (so a load that reproduces it finds its constants
    by linear, not by graph); and greedy generation's tokens and scores ("generate": prompt and
    decode graphs, compiled after saving too)."""
    torch._dynamo.reset()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = qcompile.quantize(model, _calibration(), **OPTIONS)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(2))
    expected = {19: _logits(qmodel, ids)}
    directory = tmp_path_factory.mktemp("artifact") / "tiny-w4a4"
    qmodel.save(directory)
    expected[7] = _logits(qmodel, ids[:, :7])
    expected["generate"] = _generate(qmodel, ids[:, :9])
    torch._dynamo.reset()
    return model, before, qmodel, directory, ids, expected


def test_quantize_leaves_the_model_alone(saved):
    model, before, qmodel, *_ = saved
    assert qmodel.recipe == "w4a4" and "insert-quantizers" in qmodel.pipeline
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_reproduces_the_logits_bit_exactly_without_calibration(saved, monkeypatch):
    model, _, qmodel, directory, ids, expected = saved

    def no_calibration(*args, **kwargs):
        raise AssertionError("load() must not calibrate")

    monkeypatch.setattr(calibrate, "observe_model", no_calibration)
    monkeypatch.setattr(calibrate, "observe", no_calibration)
    loaded = qcompile.load(model, directory, **OPTIONS)
    assert loaded.recipe == "w4a4"
    for n in (19, 7):  # the second length is a recompile, replayed as well
        assert torch.equal(_logits(loaded, ids[:, :n]), expected[n])
    # a fused integer linear in every loaded graph: the quantized model runs, not the float one
    assert loaded.graphs and all(g.count_ops(torch.ops.q4.linear_w4a4.default) > 0 for g in loaded.graphs)
    _assert_same_constants(loaded.graphs, qmodel.graphs)


def _assert_same_constants(loaded_graphs, quantized_graphs) -> None:
    """Every constant of every loaded graph is, to the bit, one the quantized graphs hold under
    its name (graph by graph they need not pair up: the quantizing process also ran quantize()'s
    first call, so Dynamo split its later calls into other graphs)."""
    quantized: dict[str, list[torch.Tensor]] = {}
    for graph in quantized_graphs:
        for name, t in saved_artifact.graph_constants(graph.graph_module).items():
            quantized.setdefault(name, []).append(t)
    assert loaded_graphs
    for graph in loaded_graphs:
        for name, t in saved_artifact.graph_constants(graph.graph_module).items():
            assert any(t.dtype == q.dtype and torch.equal(t, q) for q in quantized.get(name, [])), name


def test_torch_compile_with_the_artifact_option(saved):
    model, _, _, directory, ids, expected = saved
    compiled = torch.compile(model, backend="q4", options={**OPTIONS, "artifact": str(directory)})
    assert torch.equal(_logits(compiled, ids[:, :7]), expected[7])


def test_the_artifact_holds_deduplicated_blobs_and_a_manifest(saved):
    *_, directory, _, _ = saved
    loaded = saved_artifact.read(directory)
    manifest = loaded.manifest
    assert manifest["format_version"] == saved_artifact.FORMAT_VERSION
    assert manifest["torch_version"] == torch.__version__ and manifest["qcompile_version"] == qcompile.__version__
    memo, constants = manifest["memo"], manifest["constants"]
    assert any(key.startswith("gptq/") for key in memo)
    assert any(key.startswith("search-clip/") for key in memo)
    # a result is keyed by step, linear and arguments; its tensor inputs are remembered by fingerprint
    (gptq_q,) = [e for key, entries in memo.items() if key.startswith("gptq/model.layers.0.self_attn.q_proj.weight/")
                 for e in entries]
    assert gptq_q["inputs"][0]["shape"] == [64, 64] and gptq_q["inputs"][0]["dtype"] == "float32"
    # the constants the pipeline computed, by name: a packed weight is GPTQ's result, stored once;
    # a parameter the graph reads as it is (the embedding) is the model's, checked by hash
    assert constants["model_layers_0_self_attn_q_proj_weight_packed"] == [gptq_q["result"][0]]
    assert "model_layers_0_input_layernorm_weight_migrated" in constants
    assert not any(name.startswith("model_embed_tokens") for name in constants)
    # q, k and v read one activation: its statistics are stored once
    stats = manifest["stats"]
    q, k = stats["model.layers.0.self_attn.q_proj.weight"], stats["model.layers.0.self_attn.k_proj.weight"]
    assert q["samples"] == k["samples"]
    references = (sum(len(e["result"]) for entries in memo.values() for e in entries) + 3 * len(stats)
                  + sum(len(digests) for digests in constants.values()))
    assert len(loaded.blobs) < references


# --- portability: another machine's float arithmetic ---------------------------------------------


def _nudge(t: torch.Tensor, ulps: int) -> torch.Tensor:
    """`t` with every nonzero element `ulps` floats up or down (a fixed random direction each):
    the last bits another thread count, torch version or CPU kind may give."""
    if not t.dtype.is_floating_point or not t.numel():
        return t
    up = torch.rand(t.shape, generator=torch.Generator().manual_seed(t.numel())) < 0.5
    towards = torch.full_like(t, math.inf).masked_fill(~up, -math.inf)
    out = t
    for _ in range(ulps):
        out = torch.nextafter(out, towards)
    return torch.where(t == 0, t, out)


def _change_replayed_floats(monkeypatch, change) -> None:
    """While a load runs its passes, every float constant a pass reads (a parameter, or a weight
    an earlier pass migrated or rotated) and every calibration statistic goes through `change`:
    so does everything the cheap steps compute from them, the inputs of every memoized step and
    the constants of the final graph included."""
    get_constant, run = ir.get_constant, PassManager.run
    passes_running = []

    def changed_constant(gm, node):
        t = get_constant(gm, node)
        # not a rotation's factors, which weight expressions read too: fixed ones are exact on any
        # machine (q4.rotate checks them), learned ones are replayed results
        factor = isinstance(node, fx.Node) and "rotation_" in str(node.target)
        return change(t) if passes_running and t is not None and not factor else t

    def changed_run(manager, gm):
        changed = {}
        for n in gm.graph.nodes:
            stats = n.meta.get(ir.CALIB)
            if stats is not None:
                if id(stats) not in changed:  # q, k and v share theirs
                    changed[id(stats)] = dataclasses.replace(stats, **{
                        f: change(getattr(stats, f)) for f in ("absmax", "robust", "observed_samples", "sinks", "rest_absmax")
                        if getattr(stats, f) is not None})
                n.meta[ir.CALIB] = changed[id(stats)]
        passes_running.append(True)
        try:
            return run(manager, gm)
        finally:
            passes_running.clear()

    monkeypatch.setattr(ir, "get_constant", changed_constant)
    monkeypatch.setattr(PassManager, "run", changed_run)


def test_a_memo_lookup_passes_last_bit_differences_and_names_any_other():
    """The tolerance, on one step: a few ulps of every element (float32 or bfloat16) find the
    saved result; 0.1%, another shape or another argument are a MemoMiss saying which."""
    from qcompile.core.memo import MEMO, MemoMiss, memoized

    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.meta[MEMO] = Memo()
    weights = {dtype: torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
               for dtype in (torch.float32, torch.bfloat16)}
    results = {dtype: memoized(gm, "gptq", "w", (w, 4), lambda w=w: (w * 2, 0.5)) for dtype, w in weights.items()}
    gm.meta[MEMO] = Memo(gm.meta[MEMO].entries, strict=True)  # as loaded: never computes

    def never():
        raise AssertionError("computed")

    for dtype, w in weights.items():
        ulps = 16 if dtype == torch.float32 else 1
        found = memoized(gm, "gptq", "w", (_nudge(w, ulps), 4), never)
        assert all(a is b for a, b in zip(found, results[dtype]))  # the saved result itself
    w = weights[torch.float32]
    with pytest.raises(MemoMiss, match=r"gptq/w/.* was computed from other inputs: tensor input 0 \(float32 "
                                       r"\[48, 64\]\) differs: its L1 norm .*\(relative difference 0\.001, "
                                       r"tolerance 0\.0001\)"):
        memoized(gm, "gptq", "w", (w * 1.001, 4), never)
    with pytest.raises(MemoMiss, match=r"differs: float32 \[32, 64\], saved float32 \[48, 64\]"):
        memoized(gm, "gptq", "w", (w[:32], 4), never)
    with pytest.raises(MemoMiss, match="no saved result for gptq/w/"):
        memoized(gm, "gptq", "w", (w, 3), never)


def test_a_fingerprint_sums_a_large_tensor_a_chunk_at_a_time(monkeypatch):
    """Float64 sums convert their input whole (an lm_head's fingerprint made a 217 MiB copy): they
    run a chunk at a time, and agree with one sum over the whole to float64's rounding."""
    from qcompile.core import memo

    t = torch.randn(10 * 1024 + 77, generator=torch.Generator().manual_seed(0))
    whole = memo._summarize(t)
    monkeypatch.setattr(memo, "_CHUNK", 2048)
    chunked = memo._summarize(t)
    assert chunked == pytest.approx(whole, rel=1e-12, abs=1e-9)
    assert memo.Fingerprint.of(t).mismatch(memo.Fingerprint("float32", tuple(t.shape), whole)) is None


@pytest.fixture
def no_expensive_steps(monkeypatch):
    """A load looks every expensive step up: computing one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a load must never compute an expensive step")

    for module, name in ((gptq, "quantize_gptq"), (gptq, "low_rank_compensation"), (scale_search, "search_clip"),
                         (scale_search, "search_formats"), (scale_search, "search_migration"),
                         (learn_rotation, "learn_rotation"), (split_channels, "choose_split")):
        monkeypatch.setattr(module, name, refuse)


def test_a_load_whose_replayed_floats_differ_in_the_last_bits_is_still_bit_exact(saved, monkeypatch,
                                                                                  no_expensive_steps):
    """The portability proof: every float the replayed passes read is 16 ulps off (as on another
    machine; 2e-6 relative, far under the tolerance, and enough that the logits would differ if the
    replayed constants were kept), so every memoized step's inputs and every constant the pipeline
    computes differ from the saved process's in their last bits. The load still finds every result
    (by fingerprint, within the tolerance), checks every computed constant and puts the saved bytes
    in its place: the same constants and logits to the bit, for the saved graph and for graphs
    compiled after saving (another length, generate's prompt and decode steps)."""
    model, _, qmodel, directory, ids, expected = saved
    _change_replayed_floats(monkeypatch, lambda t: _nudge(t, 16))
    lookups, inexact = [], []
    get_or_compute = Memo.get_or_compute

    def looked_up(memo, key, inputs, compute):
        lookups.append(key)
        if not any(e.inputs == tuple(inputs) for e in memo.entries.get(key, [])):
            inexact.append(key)
        return get_or_compute(memo, key, inputs, compute)

    differing = []
    restore = saved_artifact.SavedArtifact.restore_constants

    def restored(artifact, gm, computed):
        named = artifact.manifest["constants"]
        differing.extend(name for name, t in computed.items()
                         if not any(torch.equal(t, artifact.blobs[d]) for d in named.get(name, ())))
        return restore(artifact, gm, computed)

    monkeypatch.setattr(Memo, "get_or_compute", looked_up)
    monkeypatch.setattr(saved_artifact.SavedArtifact, "restore_constants", restored)
    loaded = qcompile.load(model, directory, **OPTIONS)
    for n in (19, 7):
        assert torch.equal(_logits(loaded, ids[:, :n]), expected[n])
    generated = _generate(loaded, ids[:, :9])
    assert len(generated) == len(expected["generate"])
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(generated, expected["generate"]))
    _assert_same_constants(loaded.graphs, qmodel.graphs)
    # the perturbation reached what it should have: each lookup's inputs differed from the saved
    # ones, and so did constants the pipeline computed (activation steps, migrated norms)
    assert lookups and inexact == lookups
    assert any(name.endswith("_a_step") for name in differing)
    assert any(name.endswith("_migrated") for name in differing)


def test_replayed_floats_far_beyond_the_tolerance_are_refused_not_recomputed(saved, monkeypatch,
                                                                               no_expensive_steps):
    """1% is not last bits but another model or pipeline: an ArtifactError naming the step, the
    linear and the input that differs, never a model built on the wrong results."""
    model, *_, directory, ids, _ = saved
    _change_replayed_floats(monkeypatch, lambda t: t * 1.01 if t.dtype.is_floating_point else t)
    loaded = qcompile.load(model, directory, **OPTIONS)
    with pytest.raises(Exception, match=r"does not match this model or pipeline: in pass .*the saved result for "
                                        r"[a-z-]+/model\.layers\.0\.[a-z_.]+/[0-9a-f]+ was computed from other inputs: "
                                        r"tensor input \d \(float32 \[.*\]\) differs: its .*\(relative difference 0\.01"
                       ) as raised:
        _logits(loaded, ids)
    assert isinstance(getattr(raised.value, "inner_exception", raised.value), ArtifactError)


def test_a_saved_constant_the_replay_does_not_reproduce_is_refused(saved, tmp_path):
    """An artifact whose saved constant differs from what its own pipeline computes (beyond the
    tolerance) is refused naming that constant, never loaded with either value."""
    model, *_, directory, ids, _ = saved
    name = "model_layers_0_input_layernorm_weight_migrated"
    loaded = saved_artifact.read(directory)
    (digest,) = loaded.manifest["constants"][name]
    wrong = loaded.blobs[digest] * 1.5
    wrong_digest = saved_artifact.tensor_hash(wrong)
    _rewrite_manifest(directory, tmp_path / "wrong", lambda m: m["constants"].update({name: [wrong_digest]}),
                      add={wrong_digest: wrong})
    with pytest.raises(Exception, match=f"does not match this model or pipeline: the quantized graph's constant "
                                        f"'{name}' is not the saved one \\(element \\d+ is .* times the tolerance"):
        _logits(qcompile.load(model, tmp_path / "wrong", **OPTIONS), ids)


@pytest.mark.slow
def test_a_load_in_a_process_with_another_thread_count_is_bit_exact(saved, tmp_path):
    """Saved here, loaded in a new process with another torch thread count."""
    model, *_, directory, ids, expected = saved
    threads = 1 if torch.get_num_threads() > 1 else 3
    script = f"""
import torch, qcompile
from tests.helpers.models import tiny_llama
torch.set_num_threads({threads})
loaded = qcompile.load(tiny_llama(), {str(directory)!r}, progress=False, lower="eager")
ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
with torch.no_grad():
    torch.save(loaded(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
"""
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])  # the repository: `tests` imports
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected[19])


def test_a_different_model_is_refused(saved):
    *_, directory, _, _ = saved
    other = tiny_llama(seed=1)
    with pytest.raises(ArtifactError, match="different model"):
        qcompile.load(other, directory, **OPTIONS)
    # through torch.compile the per-parameter check names the parameter
    compiled = torch.compile(other, backend="q4", options={**OPTIONS, "artifact": str(directory)})
    with pytest.raises(Exception, match=r"different model: parameter '.*' differs"):
        _logits(compiled, torch.zeros(1, 5, dtype=torch.long))


def _rewrite_manifest(src, dst, edit, add: dict | None = None) -> None:
    """Copy artifact `src` to `dst` with its manifest changed by `edit`, and the tensors `add`
    (by digest) beside its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src / saved_artifact.FILE_NAME), framework="pt") as f:
        manifest = json.loads(f.metadata()["qcompile"])
        tensors = {k: f.get_tensor(k) for k in f.keys()} | (add or {})
    edit(manifest)
    dst.mkdir()
    save_file(tensors, str(dst / saved_artifact.FILE_NAME), metadata={"qcompile": json.dumps(manifest)})


def test_another_format_version_is_refused(saved, tmp_path):
    """Version 1 (results keyed by the exact bytes of their inputs) as well as a future one."""
    model, *_, directory, _, _ = saved
    for version in (1, 99):
        _rewrite_manifest(directory, tmp_path / f"v{version}", lambda m, v=version: m.update(format_version=v))
        with pytest.raises(ArtifactError, match=f"format version {version}.*reads version "
                                                f"{saved_artifact.FORMAT_VERSION}: quantize the model again"):
            qcompile.load(model, tmp_path / f"v{version}", **OPTIONS)


def test_a_missing_result_is_refused_not_recomputed(saved, tmp_path):
    model, *_, directory, ids, _ = saved
    _rewrite_manifest(directory, tmp_path / "no-gptq",
                      lambda m: m.update(memo={k: v for k, v in m["memo"].items() if not k.startswith("gptq/")}))
    loaded = qcompile.load(model, tmp_path / "no-gptq", **OPTIONS)
    with pytest.raises(Exception, match="does not match this model or pipeline.*no saved result for gptq/"):
        _logits(loaded, ids)


def test_a_truncated_file_is_refused(saved, tmp_path):
    model, *_, directory, _, _ = saved
    data = (directory / saved_artifact.FILE_NAME).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / saved_artifact.FILE_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        qcompile.load(model, tmp_path / "cut", **OPTIONS)


def test_a_corrupted_tensor_is_refused(saved, tmp_path):
    model, *_, directory, _, _ = saved
    data = bytearray((directory / saved_artifact.FILE_NAME).read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 100] ^= 0x55  # a byte of the first tensor's data
    (tmp_path / "flip").mkdir()
    (tmp_path / "flip" / saved_artifact.FILE_NAME).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted: tensor .* does not match its hash"):
        qcompile.load(model, tmp_path / "flip", **OPTIONS)


def test_not_an_artifact(saved, tmp_path):
    model = saved[0]
    with pytest.raises(ArtifactError, match="q4.safetensors is missing"):
        qcompile.load(model, tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / saved_artifact.FILE_NAME))
    with pytest.raises(ArtifactError, match="not a q4 artifact"):
        qcompile.load(model, tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty list of batches"):
        qcompile.quantize(tiny_llama(), [])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        qcompile.quantize(lambda x: x, _calibration())
    with pytest.raises(TypeError, match="makes the artifact"):
        qcompile.quantize(tiny_llama(), _calibration(), artifact="somewhere")


class _Effect:
    """Unpickling it creates a directory: the visible side effect of code run from a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.marker),)


def _untrusted_kernel_cache(marker) -> bytes:
    """A compiled-kernels cache in torch.compiler's own format whose loading runs code: one
    Inductor entry whose pickled graph creates `marker` when `load_cache_artifacts` unpickles it."""
    import pickle
    import types

    from torch._inductor.codecache import InductorCacheArtifact
    from torch.compiler._cache import _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    graph = types.SimpleNamespace(_triton_bundle=None, effect=_Effect(marker))
    serializer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    serializer.append(("inductor", [InductorCacheArtifact("qcompile-test-untrusted-entry", pickle.dumps(graph))]))
    return serializer.to_bytes()


def test_a_default_load_runs_no_code_from_the_artifact(saved, tmp_path):
    """An artifact whose compiled.bin (with a consistent hash in the manifest) runs code when
    loaded: `qcompile.load` reads only safetensors and JSON and compiles here; only
    `trust_compiled=True` hands the file to torch.compiler, and then the code runs (so the file
    is live, and the default's safety is not an accident of a broken payload)."""
    import hashlib

    model, *_, directory, ids, _ = saved
    marker = tmp_path / "code-from-the-artifact-ran"
    payload = _untrusted_kernel_cache(marker)
    untrusted = tmp_path / "untrusted"
    _rewrite_manifest(directory, untrusted, lambda m: m.update(
        compiled={"file": saved_artifact.KERNEL_CACHE_FILE_NAME, "sha256": hashlib.sha256(payload).hexdigest()}))
    (untrusted / saved_artifact.KERNEL_CACHE_FILE_NAME).write_bytes(payload)

    torch._dynamo.reset()
    _logits(qcompile.load(model, untrusted, progress=False, lower="inductor"), ids[:, :7])
    assert not marker.exists()

    torch._dynamo.reset()
    _logits(qcompile.load(model, untrusted, progress=False, lower="inductor", trust_compiled=True), ids[:, :7])
    assert marker.exists()


def test_trust_compiled_is_not_read_from_the_environment(monkeypatch):
    from qcompile.core.config import env_names, resolve_options

    assert "Q4_TRUST_COMPILED" not in env_names()
    monkeypatch.setenv("Q4_TRUST_COMPILED", "1")
    with pytest.warns(UserWarning, match="Q4_TRUST_COMPILED"):
        assert resolve_options({}).trust_compiled is False
