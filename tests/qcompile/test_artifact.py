"""Artifacts: quantize -> save -> load gives the same model to the bit, with no calibration; every
way an artifact can be wrong is a clear `ArtifactError`, never a model with garbage weights.

Tiny random Llamas, eager lowering (the Inductor path is the SmolLM2 test's,
tests/examples/test_artifact_smollm2.py, which also loads in a new process)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import qcompile
from qcompile.api.artifact import ArtifactError
from qcompile.frontend import calibrate, saved_artifact
from tests.helpers.models import tiny_llama

OPTIONS = {"progress": False, "lower": "eager"}


def _calibration(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, 24), generator=g)} for _ in range(2)]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama quantized with the default recipe (GPTQ + clipping search: memoized
    results), its artifact directory, and the quantized logits for two prompt lengths."""
    torch._dynamo.reset()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = qcompile.quantize(model, _calibration(), **OPTIONS)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(2))
    expected = {n: _logits(qmodel, ids[:, :n]) for n in (19, 7)}
    directory = tmp_path_factory.mktemp("artifact") / "tiny-w4a4"
    qmodel.save(directory)
    torch._dynamo.reset()
    return model, before, qmodel, directory, ids, expected


def test_quantize_leaves_the_model_alone(saved):
    model, before, qmodel, *_ = saved
    assert qmodel.recipe == "w4a4" and "insert-quantizers" in qmodel.pipeline
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_reproduces_the_logits_bit_exactly_without_calibration(saved, monkeypatch):
    model, _, _, directory, ids, expected = saved

    def no_calibration(*args, **kwargs):
        raise AssertionError("load() must not calibrate")

    monkeypatch.setattr(calibrate, "observe_model", no_calibration)
    monkeypatch.setattr(calibrate, "observe", no_calibration)
    loaded = qcompile.load(model, directory, **OPTIONS)
    assert loaded.recipe == "w4a4"
    for n, logits in expected.items():  # the second length is a recompile, replayed as well
        assert torch.equal(_logits(loaded, ids[:, :n]), logits)
    # a fused integer linear in every loaded graph: the quantized model runs, not the float one
    assert loaded.graphs and all(g.count_ops(torch.ops.q4.linear_w4a4.default) > 0 for g in loaded.graphs)


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
    assert any(key.startswith("gptq/") for key in manifest["memo"])
    assert any(key.startswith("search-clip/") for key in manifest["memo"])
    # q, k and v read one activation: its statistics are stored once
    stats = manifest["stats"]
    q, k = stats["model.layers.0.self_attn.q_proj.weight"], stats["model.layers.0.self_attn.k_proj.weight"]
    assert q["samples"] == k["samples"]
    assert len(loaded.blobs) < sum(len(v) for v in manifest["memo"].values()) + 3 * len(stats)


def test_a_different_model_is_refused(saved):
    *_, directory, _, _ = saved
    other = tiny_llama(seed=1)
    with pytest.raises(ArtifactError, match="different model"):
        qcompile.load(other, directory, **OPTIONS)
    # through torch.compile the per-parameter check names the parameter
    compiled = torch.compile(other, backend="q4", options={**OPTIONS, "artifact": str(directory)})
    with pytest.raises(Exception, match=r"different model: parameter '.*' differs"):
        _logits(compiled, torch.zeros(1, 5, dtype=torch.long))


def _rewrite_manifest(src, dst, edit) -> None:
    """Copy artifact `src` to `dst` with its manifest changed by `edit` (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src / saved_artifact.FILE_NAME), framework="pt") as f:
        manifest = json.loads(f.metadata()["qcompile"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(manifest)
    dst.mkdir()
    save_file(tensors, str(dst / saved_artifact.FILE_NAME), metadata={"qcompile": json.dumps(manifest)})


def test_another_format_version_is_refused(saved, tmp_path):
    model, *_, directory, _, _ = saved
    _rewrite_manifest(directory, tmp_path / "v99", lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99.*reads version 1"):
        qcompile.load(model, tmp_path / "v99", **OPTIONS)


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
