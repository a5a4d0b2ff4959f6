"""`generate()` on a q4-compiled model: the forms that quantize, and the one that used not to.

Hugging Face's `generate()` calls the model's `forward` once for the prompt and once per new
token. It quantizes when that `forward` is compiled by q4:

    model.forward = torch.compile(model.forward, backend="q4", options=...)   # then model.generate(...)
    qmodel = qcompile.quantize(model, ...); qmodel.generate(...)             # QuantizedModel.generate
    compiled = torch.compile(model, backend="q4", options=...); compiled.generate(...)

The last form is what users write, and torch alone gets it wrong: `compiled` is Dynamo's
`OptimizedModule`, whose attribute lookup hands `generate` to the original module, whose
`forward` is not compiled, so every token runs in float and no graph is ever compiled. When the
q4 backend is loaded (by `backend="q4"` or any import of `qcompile.backends`), `install()` makes
the `generate` of an `OptimizedModule` whose backend is q4 run the original's `generate` with the
original's `forward` compiled by the same backend and options for the length of the call
(`compiled_generate`). Other backends' modules are not touched.

The compiled forward is made once per `OptimizedModule` and kept on it, so Dynamo's cache (keyed
by the forward's code) serves every later `generate()`: the prompt and decode graphs compile once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule, innermost_backend

__all__ = ["compiled_generate", "forward_replaced", "install", "is_q4_module"]

_FORWARD = "_q4_compiled_forward"  # where an OptimizedModule keeps its compiled forward


def is_q4_module(module: Any, is_q4_backend: Callable[[Any], bool]) -> bool:
    """Is `module` an OptimizedModule whose backend `is_q4_backend` recognizes?"""
    if not isinstance(module, OptimizedModule):
        return False
    backend = innermost_backend(module.dynamo_ctx.callback)
    return is_q4_backend(getattr(backend, "compiler_fn", backend))


@contextlib.contextmanager
def forward_replaced(model: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """`model.forward` is `forward` inside the block, and what it was before after it."""
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward


def compiled_generate(compiled: OptimizedModule) -> Callable[..., Any]:
    """The original module's `generate`, run with its `forward` compiled by `compiled`'s backend."""
    original = compiled._orig_mod
    forward = compiled.__dict__.get(_FORWARD)
    if forward is None:
        forward = compiled.dynamo_ctx(original.forward)  # the same backend, options and mode
        compiled.__dict__[_FORWARD] = forward

    @functools.wraps(original.generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        with forward_replaced(original, forward):
            return original.generate(*args, **kwargs)

    return generate


def install(is_q4_backend: Callable[[Any], bool]) -> None:
    """Route `generate` of q4-compiled OptimizedModules through `compiled_generate` (once)."""
    lookup = OptimizedModule.__getattr__
    if getattr(lookup, "_q4_generate", False):
        return

    def __getattr__(self: OptimizedModule, name: str) -> Any:
        value = lookup(self, name)
        if name == "generate" and callable(value) and is_q4_module(self, is_q4_backend):
            return compiled_generate(self)
        return value

    __getattr__._q4_generate = True  # type: ignore[attr-defined]
    OptimizedModule.__getattr__ = __getattr__  # type: ignore[method-assign]
