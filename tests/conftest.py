"""Session setup and shared fixtures. The helpers they build on live in tests/helpers/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers (scripts/test.sh runs one per core) share the cores: each takes its part
# for torch's threads (and the tests' subprocesses, which inherit it), so that two workers' OpenMP
# threads do not contend for the same cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

import pytest  # noqa: E402  (after the environment above)
import torch  # noqa: E402

if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU, Triton kernels run in Triton's interpreter, which must be on before triton is
# first imported (anything may import it: Inductor does): so at the start of the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qcompile.passes  # noqa: E402, F401  (declares qcompile's own passes, before any registry snapshot)
from qcompile.core import pass_api  # noqa: E402
from qcompile.core.memory import release_freed_memory  # noqa: E402
from tests.helpers.models import tiny_bert, tiny_llama  # noqa: E402
from tests.helpers.passes import TOY_PASSES  # noqa: E402
from tests.helpers.recipes import quick  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Session fixtures too costly to build twice: under pytest-xdist (`--dist loadgroup`) the tests
# that use one run in the same worker, which builds it once.
BUILT_ONCE = ("eval_table", "smollm2_artifact")


def pytest_collection_modifyitems(items):
    for item in items:
        for name in BUILT_ONCE:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache entries leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def freed_memory_returned(request):
    """After a test on a real model, the allocator's freed memory goes back to the system: each
    such test frees gigabytes (activations, logits of 2048 tokens) that glibc would otherwise keep,
    and the session would grow to the machine's limit (qcompile/core/memory.py)."""
    yield
    if request.node.get_closest_marker("model") is not None:
        release_freed_memory()


@pytest.fixture(autouse=True)
def pass_registry():
    """The pass registry as it was before the test, restored after it: a pass a test registers
    (a toy pass, a user's pass file it imports) is gone for the next test, whatever the order."""
    with pass_api.registry_restored():
        yield


@pytest.fixture
def toy_passes(pass_registry):
    """The toy passes of tests/helpers/passes.py, registered for this test only."""
    for cls in TOY_PASSES:
        pass_api.register_pass(cls)
    return TOY_PASSES


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


# --- the real models, each expensive step once per session (tests marked `model`) ----------------


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, loaded once for the tests that run it in this
    process. Shared, so read-only: compiling with q4 never writes to it; a test that changes the
    model itself works on a copy."""
    from qcompile.tools import zoo

    return zoo.load_smollm2()


@pytest.fixture(scope="session")
def eval_table() -> subprocess.CompletedProcess:
    """`qcompile eval` on both real models, short (1024 tokens of Pride and Prejudice, 4 batches
    of Emma, 20 sentences), FP32, w4a4-hadamard, w4a4 and fp4, run once as a user runs it: the
    accuracy test (tests/examples/test_eval.py) and the command line's (tests/test_cli.py) read
    its table. Lowered eagerly (`Q4_LOWER=eager`: the same graphs and ops, run op by op): Inductor's
    compiles of every graph took most of its 1257 s in CI; 390 s eagerly on 2 idle cores."""
    return subprocess.run(
        [sys.executable, "-m", "qcompile", "eval", "--tokens", "1024", "--calibration-batches", "4",
         "--sentences", "20", "--recipes", "w4a4-hadamard,w4a4,fp4"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, env={**os.environ, "Q4_LOWER": "eager"})


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`qcompile bench artifact` on a short input, run once as a user runs it: SmolLM2 quantized
    with w4a4 on 128 calibration tokens of Emma (one batch), saved, loaded in a new process. The
    benchmark's test reads its table; the Triton test compiles from the saved artifact, so GPTQ
    runs once for both. Its rotations are learned in a few steps (`Q4_PIPELINE`: the same passes,
    learned factors and kernels, tests/helpers/recipes.py). (process, the artifact's directory)"""
    directory = tmp_path_factory.mktemp("smollm2-w4a4") / "artifact"
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "bench", "artifact", "--calibration-tokens", "128",
         "--prompt-tokens", "24", "--no-compiling-load", "--dir", str(directory)],
        capture_output=True, text=True, timeout=1500, cwd=ROOT, env={**os.environ, "Q4_PIPELINE": quick("w4a4")})
    return proc, directory
