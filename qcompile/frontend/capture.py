"""What Dynamo hands a backend, read: the frame it compiles and which graph inputs are the
user's parameters and buffers (and their names).

Dynamo passes parameters and buffers as graph inputs; their sources name them
(`L['self']._modules['model']._parameters['weight']`), which freezing turns into constants named
`model.weight` (`ir.FQN`), the name calibration statistics and saved artifacts are keyed by.
"""

from __future__ import annotations

import dataclasses
import re
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
    """The graph inputs that are the user's parameters and buffers: {input index: (tensor, fqn)}."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {
        i: (v, fqn(source_name(n)))
        for i, (n, v) in enumerate(zip(placeholders, example_inputs))
        if is_state(n, v)
    }
