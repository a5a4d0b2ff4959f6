"""IR helpers shared by the backend and the passes: node meta keys, constants, provenance.

The IR is a `torch.fx.GraphModule` at ATen level (pre-dispatch: `aten.linear`, `aten.layer_norm`
and `aten.scaled_dot_product_attention` stay single nodes, which keeps printed graphs readable).
Frozen parameters are `get_attr` nodes whose targets are tensor attributes of the module.

Node meta keys written by qcompile (torch's own keys such as `nn_module_stack`, `stack_trace`
and `val` are kept as they came from Dynamo):

    q4_provenance   {"pass": name, "from": [names of the nodes it replaced or was derived from]}
    q4_calib        ChannelStats of the activation this linear reads (set by calibration)
    q4_fqn          the user's parameter name of a frozen constant ("model.layers.0.q_proj.weight")
    q4_outliers     OutlierInfo of the activation a linear reads (set by analyze-outliers)
    q4_act_clip     searched clipping ratio of a linear's static activation step (1.0 = absmax)
    q4_migration    what migrate-scales did for a linear: {"status": "migrated" | "unmatched", "reason": str}
    q4_float_reason why insert-quantizers left a linear in float (absent when it was quantized)
    q4_quantized    what the insert-quantizers run that took a linear did: a `QuantizedBy`
    q4_sinks        insert-quantizers{sinks=true}: "first token 8-bit", or "none: <why>"

Graph-module meta (`gm.meta`):

    q4_passes_run   the names of the passes that have run on this graph, in order (`QPass.__call__`
                    appends; the verifier checks the invariants those passes declare)

Every node a pass creates goes through `mark_created`, which records its provenance and gives it
`val` from its op's fake implementation (`set_fake_value`), so later passes and the printer read
shapes and dtypes of new nodes the same way as of traced ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from qcompile.core.memory import TRIM_AFTER_BYTES, release_freed_memory

PROVENANCE = "q4_provenance"
CALIB = "q4_calib"
FQN = "q4_fqn"
OUTLIERS = "q4_outliers"
ACT_CLIP = "q4_act_clip"
# what migrate-scales did for a linear: {"status": "migrated" | "unmatched", "reason": str}
MIGRATION = "q4_migration"
# on a multiply migrate-scales inserted (o_proj's input * 1/s): where a migrated scale lives, never folded
MIGRATION_SCALE = "q4_migration_scale"
# why insert-quantizers left a linear in float (absent when it was quantized)
FLOAT_REASON = "q4_float_reason"
# graph-module meta: the names of the passes that have run on the graph, in order
PASSES_RUN = "q4_passes_run"
# the insert-quantizers run that took a linear (rounded or, with rounding=false, not): QuantizedBy
QUANTIZED = "q4_quantized"
# how rotate-inputs rotated a linear's input: "hadamard", "learned" or "hadamard (learned was worse)"
ROTATION = "q4_rotation"
# how many input channels split-channels added to a linear's input (absent: none)
SPLIT = "q4_split"
# on the two float linears of a low-rank compensation: the module path of the linear they compensate
LOW_RANK = "q4_low_rank"
# how insert-quantizers{sinks=true} stepped a linear's first token: "first token 8-bit" or "none: why"
SINKS = "q4_sinks"
# on a static activation quantizer: the largest |x| calibration saw at its input (float), for the
# run-time check that warns when a call goes far beyond it (qcompile/backends/range_check.py)
CALIBRATED_RANGE = "q4_calibrated_range"


@dataclasses.dataclass(frozen=True)
class QuantizedBy:
    """What the insert-quantizers run that took a linear did (node meta `q4_quantized`).

    w_bits, a_bits  weight and activation bits (a_bits 16: weight-only, activations stay float)
    rounded         False for a `rounding=false` run, which takes the linear but inserts nothing
    weights         how the weight was rounded: "rtn" or "gptq" (what ran, not only what was asked)
    act_clip        the clipping ratio of the static activation step (None: weight-only or not rounded)
    run             the run's pass spec with all its options, `insert-quantizers{w-bits=4,...}`
    w_format, a_format  number formats of the codes (`qcompile/kernels/formats.py`): "int", or a 4-bit
                    float "e2m1" / "e3m0" / "e1m2" (LLM-FP4), as chosen for this linear
    w_group         k of a weight step group (`w-group`, formats.py), 0: one step per output channel
    """

    w_bits: int
    a_bits: int
    rounded: bool
    weights: str
    act_clip: float | None
    run: str
    w_format: str = "int"
    a_format: str = "int"
    w_group: int = 0

aten = torch.ops.aten

# Where torch's own meta names a user source line: 'File "x.py", line 12, in forward\n    code'
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node) -> str:
    """`file:line in fn: code` of the user line that produced `node`, or '' when unknown."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f"{path}:{line} in {fn}: {code.strip()}"


# The compiled frame's local, then any indexing into it: `L['self']`, or `L['args'][0]` when
# Dynamo compiles a decorator wrapping the forward (`wrapped_func(*args)`, transformers >= 5.2x)
_MODULE_ROOT = re.compile(r"^L\['[^']+'\](?:\[\d+\])*\.?")
_MODULE_ITEM = re.compile(r"\._modules\['([^']+)'\]")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost user module that produced `node` ("model.layers.0.mlp.up_proj"),
    from Dynamo's `nn_module_stack`; '' when unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _MODULE_ITEM.sub(lambda m: "." + m.group(1), path)
    return _MODULE_ROOT.sub("", path)


def linear_module_path(node: fx.Node) -> str:
    """The module path of a linear (`lm_head`), or, when the graph does not know it, its weight's
    name without `.weight`. The linear's own module first: a tied lm_head's weight is named after
    the embedding it shares."""
    weight = node.args[1]
    fqn = weight.meta.get(FQN, "") if isinstance(weight, fx.Node) else ""
    return module_path(node) or str(fqn).removesuffix(".weight")


def describe(node: fx.Node) -> str:
    """One line naming a node for error messages: name, op/target, source line."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = source_line(node)
    return f"%{node.name} = {node.op}[{target}]" + (f" (from {where})" if where else "")


def get_constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor a `get_attr` node refers to, or None when `node` is not a constant."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def constant_value(gm: fx.GraphModule, node: Any, depth: int = 4) -> Any:
    """The value of `node` when it depends on constants only (a `get_attr`, or a short chain of
    ops over constants such as Gemma's `1 + weight`), computed now; None otherwise."""
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return get_constant(gm, node)
    if node.op != "call_function" or depth == 0:
        return None
    if any(isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a) for a in node.args):
        return None  # a list of nodes (aten.cat's tensors): not folded here
    args = [constant_value(gm, a, depth - 1) for a in node.args]
    if any(a is None and isinstance(n, fx.Node) for a, n in zip(args, node.args)) or node.kwargs:
        return None
    with torch.no_grad():
        return node.target(*args)


def add_constant(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register `value` as a new constant attribute of `gm` under a fresh name; return the name."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", stem)
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    gm.register_buffer(name, value, persistent=True)
    return name


def delete_unused_constants(gm: fx.GraphModule) -> int:
    """Drop constant attributes no node reads any more (so their memory is freed)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name in [n for n, _ in gm.named_buffers()]:
        if "." not in name and name not in used:
            delattr(gm, name)
            dropped += 1
    return dropped


def drop_constant(gm: fx.GraphModule, node: Any) -> bool:
    """Erase the `get_attr` node `node` if nothing reads it, and its attribute with it when no
    other node names that attribute; True if the node went. A pass that replaces a weight calls
    it right away, so the weight it replaced is freed before the next one is made (a pass over
    every linear would otherwise hold two copies of the model's weights until it ends). A large
    weight's memory goes back to the system then (glibc would keep it, fragmented among the pass's
    other allocations: qcompile/core/memory.py)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node.users:
        return False
    target = node.target
    gm.graph.erase_node(node)
    if "." not in target and target in gm._buffers and \
            not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        large = gm._buffers[target].nbytes >= TRIM_AFTER_BYTES
        delattr(gm, target)
        if large:
            release_freed_memory()
    return True


def copy_meta(new: fx.Node, old: fx.Node) -> None:
    """Give `new` the user-facing meta of `old` (module stack, source line)."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", FQN, OUTLIERS, MIGRATION, ROTATION,
                SPLIT, SINKS, FLOAT_REASON, QUANTIZED):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def mark_created(node: fx.Node, pass_name: str, sources: Iterable[fx.Node]) -> fx.Node:
    """Record which pass created `node` and from which nodes; copy the first source's meta; give
    it `meta["val"]` (`set_fake_value`). Call it once `node`'s arguments are final."""
    sources = [s for s in sources if isinstance(s, fx.Node)]
    if sources:
        copy_meta(node, sources[0])
    node.meta[PROVENANCE] = {"pass": pass_name, "from": [s.name for s in sources]}
    set_fake_value(node)
    return node


def fake_mode(gm: fx.GraphModule) -> Any:
    """The FakeTensorMode of the graph's example values (the compile's own while Dynamo compiles);
    None for a graph traced without them."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode(vals) or detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])


def set_fake_value(node: fx.Node) -> Any:
    """Set `node.meta["val"]` to what its op's fake implementation gives on its inputs' values
    (a constant's: its tensor, faked), under the graph's FakeTensorMode; return it. Nothing is set
    in a graph without fake values, or when an input has none."""
    gm = node.graph.owning_module
    mode = fake_mode(gm) if gm is not None else None
    if mode is None or node.op not in ("get_attr", "call_function"):
        return None
    if node.op == "get_attr":
        value = get_constant(gm, node)
        if value is None:
            return None
        with mode:
            node.meta["val"] = mode.from_tensor(value, static_shapes=True)
        return node.meta["val"]
    missing = []

    def value_of(arg: fx.Node) -> Any:
        if "val" not in arg.meta and arg.op == "get_attr":
            set_fake_value(arg)  # a frozen constant traced without one
        if "val" not in arg.meta:
            missing.append(arg)
        return arg.meta.get("val")

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value_of)
    if missing:
        return None
    with mode, torch.no_grad():
        node.meta["val"] = node.target(*args, **kwargs)
    return node.meta["val"]


def fake_value(arg: Any) -> Any:
    """The example value (FakeTensor) torch recorded for a node, if any; None for anything that is
    not a node (a constant argument, None)."""
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None
