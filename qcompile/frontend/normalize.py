"""normalize and freeze: Dynamo's graph as the ATen IR the passes read.

normalize  make_fx in pre-dispatch mode over fake copies of the inputs: ATen ops, but
           `aten.linear`, `aten.layer_norm`, `aten.scaled_dot_product_attention` stay single
           nodes; `nn_module_stack` and `stack_trace` meta carry over. Tracing with fake inputs
           keeps Dynamo's symbolic shapes, so one graph serves every sequence length it guards.
freeze     parameter and buffer inputs become constants of the graph module (`get_attr`),
           detached from autograd; they alias the user's tensors, which are never written to.
           (Freezing after normalizing, not before, lets the tracer see parameters as ordinary
           fake inputs instead of mixing real constants into fake tracing.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import TracingContext
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.core import ir


def normalize(gm: fx.GraphModule, example_inputs: list[Any]) -> fx.GraphModule:
    """Trace Dynamo's graph to pre-dispatch ATen IR, on fake copies of the inputs."""
    context = TracingContext.try_get()
    fake_mode = context.fake_mode if context is not None else None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if fake_mode is None:
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fakify(value: Any, node: fx.Node) -> Any:
        if not isinstance(value, torch.Tensor):
            return node.meta.get("example_value", value)
        symbolic = context.tensor_to_context.get(value) if context is not None else None
        if symbolic is not None:
            return fake_mode.from_tensor(value, symbolic_context=symbolic,
                                         source=symbolic.tensor_source, trace=False)
        return fake_mode.from_tensor(value, static_shapes=True)

    fakes = [fakify(v, n) for v, n in zip(example_inputs, placeholders)]

    def run(*args: Any) -> Any:
        return fx.Interpreter(gm).run(*args)

    with torch.no_grad(), fake_mode, enable_python_dispatcher(), fx_traceback.preserve_node_meta():
        aten_gm = make_fx(run, record_module_stack=True, pre_dispatch=True)(*fakes)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm


def freeze(aten_gm: fx.GraphModule, state: dict[int, tuple[torch.Tensor, str]]) -> fx.GraphModule:
    """Replace the parameter/buffer inputs `state` {input index: (tensor, fqn)} with constants."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    graph = aten_gm.graph
    for index, (tensor, fqn) in state.items():
        node = placeholders[index]
        name = ir.add_constant(aten_gm, fqn, tensor.detach())
        with graph.inserting_before(node):
            const = graph.get_attr(name)
        const.meta.update(node.meta)
        const.meta[ir.FQN] = fqn
        node.replace_all_uses_with(const)
        graph.erase_node(node)
    aten_gm.recompile()
    return aten_gm
