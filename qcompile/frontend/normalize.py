"""normalize and freeze: Dynamo's graph as the ATen IR the passes read.

normalize  make_fx in pre-dispatch mode over fake copies of the inputs: ATen ops, but
           `aten.linear`, `aten.layer_norm`, `aten.scaled_dot_product_attention` stay single
           nodes; `nn_module_stack` and `stack_trace` meta carry over. Tracing with fake inputs
           keeps Dynamo's symbolic shapes, so one graph serves every sequence length it guards.
freeze     parameter and buffer inputs become constants of the graph module (`get_attr`),
           detached from autograd; they alias the user's tensors, which are never written to.
           (Freezing after normalizing, not before, lets the tracer see parameters as ordinary
           fake inputs instead of mixing real constants into fake tracing.) A linear written as
           `addmm(bias, x, W)` with W a [in, out] parameter (GPT-2's Conv1D) becomes the
           `aten.linear` the passes rewrite, reading W's transpose (a view of the user's tensor):

               %view_1 = aten.view(%layer_norm, [-1, 64])
               %addmm = aten.addmm(%c_attn_bias, %view_1, %c_attn_weight)      # W: [64, 192]
               %view_2 = aten.view(%addmm, [2, 12, 192])
           ->
               %linear = aten.linear(%layer_norm, %c_attn_weight_t, %c_attn_bias)  # [192, 64]
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
            # compiling: Dynamo's symbolic value; called again at run time (another module
            # instance's parameters, `CompiledGraph.bind_parameters`): the concrete one
            return value if context is None else node.meta.get("example_value", value)
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
    _addmm_as_linear(aten_gm)
    aten_gm.recompile()
    return aten_gm


def _addmm_as_linear(gm: fx.GraphModule) -> None:
    """`view(addmm(b, view(x, [-1, K]), W), [..., N])` with constant W [K, N] -> `linear(x, W.T, b)`."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.addmm.default or node.kwargs:
            continue
        bias, x, w_node = node.args
        weight = ir.get_constant(gm, w_node)
        if weight is None or weight.dim() != 2 or ir.get_constant(gm, bias) is None:
            continue
        with graph.inserting_before(node):
            w_t = graph.get_attr(ir.add_constant(gm, f"{w_node.target}_t", weight.t()))
        w_t.meta.update(w_node.meta)  # its FQN: calibration and artifacts know it as the parameter
        ir.set_fake_value(w_t)
        # the flattening views around it go: the linear reads the [..., K] input as it was
        flat = x.target is torch.ops.aten.view.default and len(node.users) == 1
        unflat = next(iter(node.users)) if flat else None
        if flat and unflat.target is torch.ops.aten.view.default and \
                list(unflat.meta["val"].shape[:-1]) == list(x.args[0].meta["val"].shape[:-1]):
            x, replaced = x.args[0], unflat
        else:
            replaced = node
        with graph.inserting_before(replaced):
            linear = graph.call_function(torch.ops.aten.linear.default, (x, w_t, bias))
        ir.copy_meta(linear, node)
        linear.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(linear)
    graph.eliminate_dead_code()
    ir.delete_unused_constants(gm)
