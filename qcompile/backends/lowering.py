"""Lowering the final graph: what Inductor sees of the q4 ops.

The passes leave `q4::` custom ops in the graph; they read well and run as they are in eager
mode. Inductor cannot look inside a custom op, so every one would run as an opaque call with
its own passes over memory. The lowering gives Inductor a decomposition into ATen ops for the
ops that are cheap elementwise or small-reduction work, so they fuse with their neighbours:

    q4.rotate(x, factors)                -> kernels.rotation.rotate_decomposed (the Hadamard part
                                            as q4_cpu's Walsh-Hadamard transform on CPU, the odd
                                            factor as multiply + sum)
    q4.token_steps(x, b, clip)           -> clip * amax(|float32(x)|, -1) / qmax (dynamic steps: a
                                            reduction fused with the loop that quantizes)
    q4.quantize_per_tensor(x, step, b)   -> clamp(round(float32(x) / step), -2**(b-1), 2**(b-1)-1).to(int8)
                                            (`ops.quantize_math`; a 4-bit float format: a few compares
                                            more; with sinks, per-row clamp bounds)

    q4.linear_w4a4(x, w_packed, ...)     -> unpack (shifts: one fused loop over the packed bytes; a
                                            4-bit float weight adds a 16-entry table lookup),
                                            the integer GEMM (`kernels.ops.int_matmul`), and the
                                            epilogue (`kernels.reference.epilogue`), which fuses
                                            with whatever reads the output (a residual add)
    q4.linear_w4a16(x, w_packed, ...)    -> the weight dequantized (one fused loop) and aten.linear

At decode, where M (the rows: x's leading dims) is a static int <= cpu_kernels.SMALL_M (W4A16:
SMALL_M_W4A16), both linears instead call the q4_cpu C++ kernels (`qcompile/kernels/cpu_kernels.py`),
which read the packed weight directly: unpacking a 4096 x 4096 weight costs more than the whole
product at M = 1. The call from Inductor's wrapper is a registered C++ op (a few µs). A
symbolic M is prefill: it keeps
the GEMM decomposition.

so `rms_norm -> rotate -> quantize` becomes a few fused loops instead of six ops with
transposing copies in between, and a linear's epilogue costs no pass of its own. The
decompositions compute the same values as the ops (the rotation up to float summation order);
`tests/backends/test_lowering.py` checks them against each other.

Attention on CPU (float32) is not ATen's: `use_cpu_attention` swaps
`aten.scaled_dot_product_attention` for `q4_cpu.attention`, whose rows round the same way at
any length, so that generate() through the KV cache computes what the no-cache forward computes,
bit for bit (with the rotation's transform, the same at any M, and the integer GEMMs, exact).

On CUDA the integer GEMM is not decomposed (rotation and quantize still fuse, as Inductor's own
Triton code): a `q4.linear_w4a4` whose K is a multiple of 64 becomes `q4.linear_w4a4_tiled` of its
weight re-laid for the GPU here, once (`use_triton_kernels`; the tuned kernel of
`qcompile/kernels/triton_tiled_gemm.py`), any other runs its CUDA kernel, the general Triton GEMM of
`qcompile/kernels/triton_gemm.py`. The `kernels="triton"` option (`Q4_KERNELS=triton`) does the same
on any device, in Triton's interpreter on CPU, with the graph otherwise lowered as usual. For CUDA
graphs Inductor is told which inputs keep their address (`with_static_inputs`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from qcompile.core import ir
from qcompile.kernels import cpu_kernels, formats, gpu_layout, ops, reference, rotation
from qcompile.kernels.ops import int_matmul  # importing ops registers torch.ops.q4
from qcompile.kernels.reference import epilogue

q4 = torch.ops.q4


def unpack_decomposed(packed: torch.Tensor, k: int, fmt: str = "int") -> torch.Tensor:
    """`kernels.formats.unpack` as one elementwise loop Inductor can generate: every byte is
    read twice (a broadcast), shifted left by 4 for its even k and 0 for its odd k, then right
    by 4 (arithmetic, on int8: the sign extension, int4's value). A 4-bit float's value is then
    looked up in its 16-entry table (an int8 constant) by the nibble, code & 15."""
    n, kp = packed.shape
    pairs = packed.view(torch.int8)[:, :, None].expand(n, kp, 2)
    left = 4 - 4 * torch.arange(2, dtype=torch.int8, device=packed.device)  # [4, 0]
    codes = torch.bitwise_right_shift(torch.bitwise_left_shift(pairs, left), 4).reshape(n, 2 * kp)
    if fmt != formats.INT:
        table = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8, device=packed.device)
        codes = table[torch.bitwise_and(codes, 15).to(torch.int64)]
    return codes if 2 * kp == k else codes[:, :k]


GEMM_COLUMNS = 8192  # wider linears run in column blocks of this many outputs


def linear_w4a4_decomposed(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                           bias: torch.Tensor | None, out_dtype: torch.dtype, w_format: str = "int",
                           w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """`q4::linear_w4a4` as unpack (times the group multipliers: the same loop) + integer GEMM +
    the one epilogue.

    A wide linear (a language-model head: N = 49152) runs in blocks of GEMM_COLUMNS outputs,
    concatenated: each block's int32 accumulator is small enough for the allocator to reuse
    (a fresh 100 MB one faults in every page, every call), and Inductor writes each block's
    epilogue straight into its slice of the output. SmolLM2's head at 512 tokens: 105 -> 77 ms.
    """
    k, n = x_codes.shape[-1], w_packed.shape[0]
    x2 = x_codes.reshape(-1, k)
    blocks = []
    for start in range(0, n, GEMM_COLUMNS):
        rows = slice(start, start + GEMM_COLUMNS)
        values = unpack_decomposed(w_packed[rows], k, w_format)
        if w_mult is not None:
            values = formats.apply_multipliers(values, w_mult[rows])
        acc = int_matmul(x2, values, ops.weight_bound(w_mult))
        blocks.append(epilogue(acc, a_step, w_step[rows], bias[rows] if bias is not None else None, out_dtype,
                               in_place=False))
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
    return out.reshape(*x_codes.shape[:-1], n)


def static_rows(x: torch.Tensor) -> int | None:
    """M = the product of x's leading dims when every one is a concrete int (static shapes); else None."""
    m = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int):
            return None
        m *= d
    return m


def linear_w4a4_decomposed_on_cpu(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor,
                                  a_step: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                                  w_format: str = "int", w_mult: torch.Tensor | None = None) -> Any:
    """The CPU decomposition: the q4_cpu kernel at decode, else the GEMM one; on other devices the
    op stays (its Triton kernel)."""
    if x_codes.device.type != "cpu":
        return NotImplemented
    if cpu_kernels.use_for(static_rows(x_codes), cpu_kernels.SMALL_M):
        return torch.ops.q4_cpu.linear_w4a4.default(x_codes, w_packed, w_step, a_step, bias, out_dtype,
                                                    cpu_kernels.FORCE_SCALAR, ops.nibble_table(w_format), w_mult)
    return linear_w4a4_decomposed(x_codes, w_packed, w_step, a_step, bias, out_dtype, w_format, w_mult)


def linear_w4a16_decomposed(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, bias: torch.Tensor | None,
                            out_dtype: torch.dtype, w_mult: torch.Tensor | None = None) -> torch.Tensor:
    """`q4::linear_w4a16` as its unfused form: the weight dequantized in x's dtype (one loop
    Inductor generates from the packed bytes), then aten.linear (the same values as the op's
    own fallback, `kernels.ops.linear_w4a16_dequantized`)."""
    values = formats.apply_multipliers(unpack_decomposed(w_packed, x.shape[-1]), w_mult)
    w = (values.to(torch.float32) * w_step[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias).to(out_dtype)


def linear_w4a16_decomposed_on_cpu(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor,
                                   bias: torch.Tensor | None, out_dtype: torch.dtype,
                                   w_mult: torch.Tensor | None = None) -> Any:
    """The CPU decomposition of the weight-only linear: q4_cpu at decode, else dequantize + linear."""
    if x.device.type != "cpu":
        return NotImplemented
    if cpu_kernels.use_for(static_rows(x), cpu_kernels.SMALL_M_W4A16):
        return torch.ops.q4_cpu.linear_w4a16.default(x, w_packed, w_step, bias, out_dtype, cpu_kernels.FORCE_SCALAR,
                                                     w_mult)
    return linear_w4a16_decomposed(x, w_packed, w_step, bias, out_dtype, w_mult)


DECOMPOSITIONS: dict[Any, Callable] = {
    q4.rotate.default: rotation.rotate_decomposed,
    q4.quantize_per_tensor.default: ops.quantize_math,
    q4.token_steps.default: ops.token_steps_math,
    q4.linear_w4a4.default: linear_w4a4_decomposed_on_cpu,
    q4.linear_w4a16.default: linear_w4a16_decomposed_on_cpu,
}


def _register_decompositions() -> None:
    """Put the decompositions in Inductor's own table, where it looks by default. (Passing a
    table of our own to compile_fx would work too, but Inductor cannot hash it: every compile
    would bypass its FX graph cache, and `torch.compiler.save_cache_artifacts` would have
    nothing to save for an artifact.) Only q4's ops are added: nothing else changes."""
    from torch._inductor import decomposition

    for op, fn in DECOMPOSITIONS.items():
        if decomposition.decompositions.get(op) is not fn:
            decomposition.register_decomposition(op)(fn)
    decomposition.fast_random_decomps.cache_clear()  # a copy of the table, cached on first use


_register_decompositions()


def _tiled_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tiled GPU layout (`kernels.gpu_layout`) of a `q4.linear_w4a4` node's weight, when the
    weight is a constant the layout covers; else None (the general kernel runs it)."""
    x, packed = ir.fake_value(node.args[0]), ir.get_constant(gm, node.args[1])
    if x is None or packed is None or not isinstance(x.shape[-1], int) or not gpu_layout.covers(x.shape[-1]):
        return None
    k = x.shape[-1]
    tiled = _TILED.get(id(packed))
    if tiled is None:  # the weight's first graph: the model's other graphs share its packed weight and this
        tiled = _TILED[id(packed)] = gpu_layout.to_tiled(packed, k)
        weakref.finalize(packed, _TILED.pop, id(packed), None)
    return tiled


def _on_cuda(node: fx.Node) -> bool:
    value = ir.fake_value(node)
    return value is not None and value.device.type == "cuda"


# a packed weight's tiled layout, while the weight lives (a recompile's graphs share the weight:
# `memory.ConstantPool`, so they share its layout too)
_TILED: dict[int, torch.Tensor] = {}


def use_triton_kernels(gm: fx.GraphModule, everywhere: bool) -> fx.GraphModule:
    """A graph module like `gm` (sharing its other constants) whose integer GEMMs run the Triton
    kernels: every `q4.linear_w4a4` whose weight the tiled layout covers (K a multiple of 64)
    becomes `q4.linear_w4a4_tiled` of that weight re-laid once, here (the tuned kernel); the
    others stay on the general kernel (`linear_w4a4`'s CUDA kernel; with `everywhere`,
    `q4.linear_w4a4_triton`). Without `everywhere` only the GEMMs on CUDA change; with it
    (kernels="triton") every one does, on CPU in Triton's interpreter, which must be on before
    triton is first imported: this turns it on if triton is not imported yet, and otherwise asks
    for TRITON_INTERPRET=1 at the start."""
    targets = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is q4.linear_w4a4.default
               and (everywhere or _on_cuda(n.args[0]))]
    if not targets:
        return gm
    if everywhere and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError("kernels='triton' (Q4_KERNELS) on CPU runs Triton's interpreter, which must be on "
                               "before triton is imported: start the process with TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    # node -> (its weight's attribute, the weight's tiled layout or None); `_tiled_weight` makes a layout once
    plan = {node.name: (node.args[1].target, _tiled_weight(gm, node)) for node in targets}
    graph = copy.deepcopy(gm.graph)
    lowered = fx.GraphModule(gm, graph)
    attrs = {target: ir.add_constant(lowered, f"{target}_tiled", layout)  # a weight read twice: one attribute
             for target, layout in plan.values() if layout is not None}
    for node in list(graph.nodes):
        if node.name not in plan:
            continue
        target, layout = plan[node.name]
        if layout is None:
            if everywhere:
                node.target = q4.linear_w4a4_triton.default
            continue
        old = node.args[1]
        with graph.inserting_before(node):
            node.args = (node.args[0], graph.get_attr(attrs[target]), *node.args[2:])
        node.target = q4.linear_w4a4_tiled.default
        if not old.users:
            graph.erase_node(old)
    ir.delete_unused_constants(lowered)
    lowered.recompile()
    return lowered


def _is_whole(node: fx.Node) -> bool:
    """A slice taking its whole axis (start 0, no end, step 1)."""
    start, end, step = (list(node.args[2:]) + [0, None, 1][len(node.args) - 2:])[:3]
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= sys.maxsize)) and step == 1


def _repeated_heads_source(node: Any) -> fx.Node | None:
    """X when `node` is transformers' `repeat_kv(X)`: reshape(expand(unsqueeze(X, 2), [b, h, g, L, d]),
    [b, h * g, L, d]), a copy of each key/value head for its g query heads (q4_cpu's attention
    reads X's heads directly: grouped queries)."""
    aten = torch.ops.aten
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    while isinstance(unsqueeze, fx.Node) and unsqueeze.target is aten.slice.Tensor and _is_whole(unsqueeze):
        unsqueeze = unsqueeze.args[0]  # x[:, :, None, :, :] traces as unsqueeze + whole-axis slices
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target is aten.unsqueeze.default and unsqueeze.args[1] == 2):
        return None
    source = unsqueeze.args[0]
    x, expanded, out = ir.fake_value(source), ir.fake_value(expand), ir.fake_value(node)
    if x is None or expanded is None or out is None or (x.dim(), expanded.dim(), out.dim()) != (4, 5, 4):
        return None
    groups = expanded.shape[2]

    def same(a, b) -> bool:  # sizes, symbolic ones by their expression (no guard)
        return str(a) == str(b)

    if not (isinstance(groups, int) and isinstance(x.shape[1], int) and out.shape[1] == x.shape[1] * groups
            and all(same(expanded.shape[i], x.shape[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3)))
            and all(same(out.shape[i], x.shape[i]) for i in (0, 2, 3))):
        return None
    return source


def _attention_on_cpu_kernel(node: fx.Node) -> dict | None:
    """The arguments of `q4_cpu.attention` for an `aten.scaled_dot_product_attention` node it
    computes (CPU, float32, [batch, heads, length, dim], no dropout), else None."""
    from torch.fx.operator_schemas import normalize_function

    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None
    a = normalized.kwargs
    q, k, v, mask = (ir.fake_value(a.get(name)) for name in ("query", "key", "value", "attn_mask"))
    if any(t is None or t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 for t in (q, k, v)):
        return None
    if a.get("attn_mask") is not None and (mask is None or mask.dtype not in (torch.bool, torch.float32)):
        return None
    heads_fit = q.shape[1] == k.shape[1] or (a.get("enable_gqa", False) and q.shape[1] % k.shape[1] == 0)
    if a.get("dropout_p", 0.0) != 0.0 or not heads_fit:
        return None
    key, value = a["key"], a["value"]
    grouped = _repeated_heads_source(key), _repeated_heads_source(value)
    if all(grouped) and ir.fake_value(grouped[0]).shape[1] == ir.fake_value(grouped[1]).shape[1]:
        key, value = grouped  # not the 3 -> 9 head copies of every layer and step (SmolLM2)
    return {"query": a["query"], "key": key, "value": value, "attn_mask": a.get("attn_mask"),
            "is_causal": a.get("is_causal", False), "scale": a.get("scale"), "force_scalar": cpu_kernels.FORCE_SCALAR}


def use_cpu_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module like `gm` (sharing its constants) whose CPU float32 attention calls
    `q4_cpu.attention` instead of ATen's (`aten.scaled_dot_product_attention`): the same values
    up to float rounding, but every query row rounds the same way at any sequence length
    (qcompile/kernels/cpu_kernels.py), so a prompt, each decode step through the KV cache and the
    no-cache forward agree bit for bit. ATen's flash attention blocks by the call's length; at
    4-bit activations one flipped code changes every later token (issue 13: perplexity through
    the cache 0.68% from no-cache before). Keys and values that transformers' `repeat_kv` copied
    for grouped queries are read from the copy's source instead. `gm` itself if there is no
    attention to swap or q4_cpu is not built."""
    target = torch.ops.aten.scaled_dot_product_attention.default
    rewrites = {n.name: args for n in gm.graph.nodes
                if n.op == "call_function" and n.target is target and (args := _attention_on_cpu_kernel(n)) is not None}
    if not rewrites or not cpu_kernels.load():
        return gm
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}  # the copy's nodes for the original's
    for name, args in rewrites.items():
        node = by_name[name]
        node.target, node.args = torch.ops.q4_cpu.attention.default, ()
        node.kwargs = {key: by_name[value.name] if isinstance(value, fx.Node) else value for key, value in args.items()}
    return fx.GraphModule(gm, graph)


class SourceStamp(CustomGraphPass):
    """A post-grad pass that changes nothing, for its uuid: a hash of the sources that decide the
    code Inductor generates from a q4 graph (these decompositions and the kernels they call).
    Inductor's and AOTAutograd's cache keys hash the graph before the decompositions run, so
    without it an edited decomposition would replay code compiled from the old one (seen while
    benchmarking this module); the uuid is part of both keys."""

    SOURCES = (__file__, rotation.__file__, cpu_kernels.__file__, ops.__file__, reference.__file__, formats.__file__,
               str(cpu_kernels.SOURCE))

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        digest = hashlib.sha256()
        for path in self.SOURCES:
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()


def written_inputs(gm: fx.GraphModule) -> set[int]:
    """Positions of the inputs the graph writes in place (a static KV cache's `index_copy_`): the
    same tensors at every call, so static for CUDA graphs (which skip a graph writing an input
    that is not, and re-record one whose static input moved)."""
    written = set()
    for i, placeholder in enumerate(gm.graph.find_nodes(op="placeholder")):
        for user in placeholder.users:
            schema = getattr(user.target, "_schema", None)
            if schema is None:
                continue
            given = {**dict(zip((a.name for a in schema.arguments), user.args)), **user.kwargs}
            if any(given.get(a.name) is placeholder and a.alias_info is not None and a.alias_info.is_write
                   for a in schema.arguments):
                written.add(i)
    return written


def with_static_inputs(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """Inductor's inner compile, told which inputs keep their address from call to call: the
    graph's constants (quantized weights, steps), which AOTAutograd lifts to the first inputs, and
    the inputs Dynamo marked static (a static KV cache: `torch._dynamo.mark_static_address`).
    Inductor reads that from Dynamo's metadata, which a q4 graph (re-traced, frozen) no longer
    carries: it then took every input for one that moves, and CUDA graphs copied every weight
    into their own memory at each replay and skipped every graph writing the KV cache (a decode
    step). The inputs the graph writes are static too (`written_inputs`). Only when the inputs
    are laid out as expected (each constant lifted once, no input dropped) are the indices
    given; otherwise Inductor's own (none) stand."""
    from torch._inductor.compile_fx import compile_fx_inner

    constants = len({**dict(gm.named_parameters(remove_duplicate=False)),
                     **dict(gm.named_buffers(remove_duplicate=False))})
    marked = {i for i, t in enumerate(example_inputs) if getattr(t, "_dynamo_static_input_type", None)}
    marked |= written_inputs(gm)

    def inner(lowered: fx.GraphModule, inputs: list[Any], **kwargs: Any) -> Any:
        if len(inputs) == constants + len(example_inputs):
            static = set(kwargs.get("static_input_idxs") or ()) | set(range(constants))
            kwargs["static_input_idxs"] = sorted(static | {constants + i for i in marked})
        return compile_fx_inner(lowered, inputs, **kwargs)

    return inner


def lower(gm: fx.GraphModule, example_inputs: list[Any], how: str, kernels: str, mode: str | None) -> Callable:
    """The callable that runs the final graph: `how` is "inductor" or "eager"; `kernels` "auto"
    (the integer GEMMs decomposed for Inductor on CPU, Triton kernels on CUDA) or "triton"."""
    gm = use_triton_kernels(gm, everywhere=kernels == "triton")
    if how == "eager":
        return gm
    gm = use_cpu_attention(gm)
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    on_cpu = any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in example_inputs) or any(
        t.device.type == "cpu" for t in gm.buffers())
    if on_cpu and any(str(node.target).startswith(("q4.linear_w4a4", "q4.linear_w4a16", "q4.rotate", "q4_cpu."))
                      for node in gm.graph.nodes):
        # a cached compile (Inductor's FX graph cache, a saved artifact) runs code calling q4_cpu ops
        # without tracing the decompositions that load them: load them first (0.1 s once built; a
        # graph on a GPU calls none, and a fresh GPU machine would build them for nothing)
        cpu_kernels.load()
    patches = torch._inductor.list_mode_options(mode) if mode else {}
    # no stride asserts in the generated wrapper: Dynamo's guards check the inputs already, and a
    # SmolLM2 decode step made ~1000 of them (0.4 µs each, 0.4 ms of an 11.6 ms step)
    patches["size_asserts"] = False
    if torch._inductor.config.post_grad_custom_post_pass is None:  # a user's own pass stays
        patches["post_grad_custom_post_pass"] = SourceStamp()
    with torch._inductor.config.patch(patches):
        # with DECOMPOSITIONS, registered above
        return compile_fx(gm, example_inputs, inner_compile=with_static_inputs(gm, example_inputs))
