"""Session setup and shared fixtures. The helpers they build on live in tests/helpers/."""

from __future__ import annotations

import os

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


def pytest_collection_modifyitems(items):
    """The modules of real-model tests first, then those of slow ones, then the rest, each module's
    tests together and in their order: pytest-xdist (scripts/test.sh) hands a worker a whole module
    at a time (`--dist loadscope`: a module's fixtures are built once), in this order, so the
    longest start first and the short ones fill in at the end."""
    def tier(item) -> int:
        return 0 if item.get_closest_marker("model") else 1 if item.get_closest_marker("slow") else 2

    modules: dict[str, int] = {}
    for item in items:
        modules[item.module.__name__] = min(modules.get(item.module.__name__, 2), tier(item))
    items.sort(key=lambda item: modules[item.module.__name__])


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
