"""What Dynamo hands a backend, read: the frame it compiles and which graph inputs are the
user's parameters and buffers (and their names).

Dynamo passes parameters and buffers as graph inputs; their sources name them
(`L['self']._modules['model']._parameters['weight']`), which freezing turns into constants named
`model.weight` (`ir.FQN`), the name calibration statistics and saved artifacts are keyed by.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any

import torch
from torch import fx

_STATE_SOURCE = re.compile(r"\._(?:parameters|buffers)\[")
_MODULE_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


@dataclasses.dataclass(frozen=True)
class Frame:
    """The Python frame Dynamo is compiling: its locals and code (empty outside Dynamo)."""

    locals: dict
    code: Any = None

    @property
    def resumed(self) -> bool:
        """Whether this graph starts after a graph break (Dynamo's resume function)."""
        return self.code is not None and self.code.co_name.startswith("torch_dynamo_resume_in")

    @property
    def module(self) -> torch.nn.Module | None:
        """The module whose forward Dynamo is compiling, from the frame's locals: Hugging Face
        models compile their forward (`self`), or the decorator wrapping it (`wrapped_func(*args)`,
        `args[0]`); other modules compile torch's call wrapper, whose `fn` is the module."""
        candidates = [self.locals.get("self"), self.locals.get("fn")]
        args = self.locals.get("args")
        if isinstance(args, tuple) and args:
            candidates.append(args[0])
        return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def _running_modules() -> list[torch.nn.Module]:
    """Every nn.Module that is `self` in a frame on the Python stack, innermost first."""
    found: list[torch.nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and not any(m is module for m in found):
            found.append(module)
        frame = frame.f_back
    return found


def calling_modules() -> list[torch.nn.Module]:
    """The modules whose calls are running now, outermost first, a compiled module
    (`torch.compile(model)`) as the model itself. While Dynamo compiles a graph after a graph
    break, the model the user called is among them: the one whose forward calibration batches fit."""
    found: list[torch.nn.Module] = []
    for module in reversed(_running_modules()):
        module = getattr(module, "_orig_mod", module)  # torch._dynamo's OptimizedModule
        if not any(m is module for m in found):
            found.append(module)
    return found


def compiled_frame() -> Frame:
    """The frame Dynamo is compiling now: calibration runs the module found there."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return Frame(tx.f_locals, tx.f_code)
    except Exception:  # noqa: BLE001 - outside Dynamo (a direct call) there is no frame
        return Frame({})


def source_name(node: fx.Node) -> str:
    """Dynamo's source of a graph input: `L['self']._modules['model']._parameters['weight']`."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    return (source() if callable(source) else source) or ""


def is_state(node: fx.Node, value: Any) -> bool:
    """Is this graph input a parameter or buffer of the user's module?"""
    if isinstance(value, torch.nn.Parameter):
        return True
    return isinstance(value, torch.Tensor) and bool(_STATE_SOURCE.search(source_name(node)))


def fqn(source: str) -> str:
    """`L['self']._modules['model']._parameters['weight']` -> `model.weight`."""
    return ".".join(_MODULE_PATH.findall(source)) or source


def graph_state(gm: fx.GraphModule, example_inputs: list[Any]) -> dict[int, tuple[torch.Tensor, str]]:
    """The graph inputs that are the user's parameters and buffers: {input index: (tensor, fqn)}.

    A source names a tensor from the frame Dynamo compiles; when that frame is a submodule's
    forward (Dynamo compiles it on its own after its caller broke the graph), the name is made
    whole from the model the user compiled (`block0.down.weight`, not `down.weight`)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = {i: (v, fqn(source_name(n))) for i, (n, v) in enumerate(zip(placeholders, example_inputs))
             if is_state(n, v)}
    root = compiled_model()
    if root is None:
        return state
    names: dict[int, str] = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)  # a tied weight: its first name, as Dynamo's source gives it
    lookup = dict(root.named_parameters(remove_duplicate=False)) | dict(root.named_buffers(remove_duplicate=False))
    return {i: (v, name if lookup.get(name) is v else names.get(id(v), name)) for i, (v, name) in state.items()}


def compiled_model() -> torch.nn.Module | None:
    """The model being run through torch.compile now: the one the innermost compiled module on
    the stack wraps, else the outermost running module (a compiled forward), else None."""
    running = _running_modules()
    wrapped = [m._orig_mod for m in running if isinstance(getattr(m, "_orig_mod", None), torch.nn.Module)]
    return wrapped[0] if wrapped else running[-1] if running else None


# --- a static KV cache's length -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptLimit:
    """A graph that writes into a static KV cache: the graph input holding the tokens (ids or
    embeddings, [batch, length, ...]) and the length the cache holds. A longer input would write
    past the cache's end, which compiled code reports as an out-of-bounds index at best."""

    input_index: int
    max_cache_len: int

    def check(self, inputs: list[Any]) -> None:
        length = inputs[self.input_index].shape[1]
        if length > self.max_cache_len:
            raise ValueError(
                f"the input has {length} tokens but the static KV cache holds {self.max_cache_len} "
                f"(max_cache_len): give a cache of at least {length} (StaticCache(config, max_cache_len=...)), "
                "or let generate() size it (cache_implementation='static')"
            )


def _static_cache_length(value: Any) -> int | None:
    """The length of a transformers static cache's full-attention layers (sliding-window layers
    roll over and never overflow); None for any other value."""
    cache_utils = sys.modules.get("transformers.cache_utils")  # not imported: no HF cache exists
    if cache_utils is None or not isinstance(value, cache_utils.Cache):
        return None
    lengths = [layer.max_cache_len for layer in value.layers if isinstance(layer, cache_utils.StaticLayer)
               and not isinstance(layer, cache_utils.StaticSlidingWindowLayer)]
    return min(lengths) if lengths else None


def _named_arguments(frame: Frame) -> dict[str, Any]:
    """The arguments of the forward Dynamo is compiling, by name: its own locals, or those of the
    decorator wrapping it (`wrapped_func(*args, **kwargs)`), positional ones bound to the module's
    forward signature."""
    named = {k: v for k, v in frame.locals.items() if k not in ("args", "kwargs", "self")}
    kwargs, args, module = frame.locals.get("kwargs"), frame.locals.get("args"), frame.module
    if isinstance(kwargs, dict):
        named.update(kwargs)
    if isinstance(args, tuple) and args and module is not None:
        positional = args[1:] if args[0] is module else args
        try:
            named.update(inspect.signature(type(module).forward).bind_partial(module, *positional).arguments)
        except TypeError:  # not the module's forward after all: keep what the names say
            pass
    return named


def prompt_limit(example_inputs: list[Any], frame: Frame) -> PromptLimit | None:
    """The PromptLimit of a graph Dynamo captured from a forward called with a static cache."""
    named = _named_arguments(frame)
    lengths = [n for n in map(_static_cache_length, named.values()) if n is not None]
    tokens = next((named[k] for k in ("input_ids", "inputs_embeds") if isinstance(named.get(k), torch.Tensor)), None)
    index = next((i for i, v in enumerate(example_inputs) if v is tokens), None)
    return PromptLimit(index, min(lengths)) if lengths and index is not None else None
