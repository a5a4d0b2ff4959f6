"""Session setup and shared fixtures. The helpers they build on live in tests/helpers/."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter, which must be on before triton is
# first imported (anything may import it: Inductor does): so at the start of the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qcompile.passes  # noqa: E402, F401  (declares qcompile's own passes, before any registry snapshot)
from qcompile.core import pass_api  # noqa: E402
from tests.helpers.models import tiny_bert, tiny_llama  # noqa: E402
from tests.helpers.passes import TOY_PASSES  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache entries leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def pass_registry():
    """The pass registry as it was before the test, restored after it: a pass a test registers
    (a toy pass, a user's pass file it imports) is gone for the next test, whatever the order."""
    registered = dict(pass_api._REGISTRY)
    yield
    pass_api._REGISTRY.clear()
    pass_api._REGISTRY.update(registered)


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
