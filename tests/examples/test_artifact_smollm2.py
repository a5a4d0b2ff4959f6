"""SmolLM2-135M: quantize with the default recipe, save, load in NEW processes: the loaded
model's logits equal the quantized model's bit for bit, and the loading process calibrates
nothing. This is `qcompile bench artifact` on a short input (the benchmark behind the
"load < 25% of quantize time" figure), run as a user runs it; every process starts with an
empty Inductor cache of its own. The run is the session's `smollm2_artifact` (tests/conftest.py),
whose saved artifact the Triton test compiles from. The artifact holds the constants the
pipeline computed, which a load checks and puts back: what keeps it bit-exact on another
machine (tests/qcompile/test_artifact.py perturbs a tiny model's replay to prove it)."""

from __future__ import annotations

import pytest

from qcompile.frontend import saved_artifact


@pytest.mark.model
def test_bench_artifact_loads_in_a_new_process_bit_exactly(smollm2_artifact):
    proc, directory = smollm2_artifact
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.startswith("SmolLM2-135M w4a4, calibration 128 tokens")
    loads = [line for line in out.splitlines() if line.startswith("load, new process")]
    assert [line.split(",")[2].split("  ")[0].strip() for line in loads] == [
        "trust_compiled=True (the artifact's compiled kernels)"]
    for line in loads:
        cells = line.split()
        assert cells[-2:] == ["yes", "none"], line  # logits bit-exact; no calibration
    assert (directory / "q4.safetensors").is_file()
    # what makes the load bit-exact on another machine: every quantized linear's packed weight,
    # steps and group multipliers, by name (the packed weight stored once: it is GPTQ's result)
    saved = saved_artifact.read(directory)
    assert saved.manifest["format_version"] == saved_artifact.FORMAT_VERSION
    constants, memo = saved.manifest["constants"], saved.manifest["memo"]
    for role in ("packed", "step", "mult"):
        assert sum(name.endswith(f"_weight_{role}") for name in constants) == 30 * 7 + 1, role
    gptq = {e["result"][0] for key, entries in memo.items() if key.startswith("gptq/") for e in entries}
    assert all(digest in gptq for name, digests in constants.items() if name.endswith("_packed") for digest in digests)
