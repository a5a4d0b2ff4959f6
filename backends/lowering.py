"""Lowering the final graph: what Inductor sees of the q4 ops.

The passes leave `q4::` custom ops in the graph; they read well and run as they are in eager
mode. Inductor cannot look inside a custom op, so every one would run as an opaque call with
its own passes over memory. The lowering gives Inductor a decomposition into ATen ops for the
ops that are cheap elementwise or small-reduction work, so they fuse with their neighbours:

    q4.rotate(x, factors)                -> kernels.rotation.rotate_decomposed (the Hadamard part
                                            as q4_cpu's Walsh-Hadamard transform on CPU at
                                            prefill, the odd factor as multiply + sum)
    q4.quantize_per_tensor(x, step, b)   -> clamp(round(float32(x) / step), -2**(b-1), 2**(b-1)-1).to(int8)

    q4.linear_w4a4(x, w_packed, ...)     -> unpack (shifts: one fused loop over the packed bytes),
                                            the integer GEMM (`kernels.ops.int_matmul`), and the
                                            epilogue (`kernels.reference.epilogue`), which fuses
                                            with whatever reads the output (a residual add)
    q4.linear_w4a16(x, w_packed, ...)    -> the weight dequantized (one fused loop) and aten.linear

At decode, where M (the rows: x's leading dims) is a static int <= cpu_kernels.SMALL_M (W4A16:
SMALL_M_W4A16), both linears instead call the q4_cpu C++ kernels (`kernels/cpu_kernels.py`),
which read the packed weight directly: unpacking a 4096 x 4096 weight costs more than the whole
product at M = 1. The call from Inductor's wrapper is a registered C++ op (a few µs). A
symbolic M is prefill: it keeps
the GEMM decomposition.

so `rms_norm -> rotate -> quantize` becomes a few fused loops instead of six ops with
transposing copies in between, and a linear's epilogue costs no pass of its own. The
decompositions compute the same values as the ops (the rotation up to float summation order);
`tests/backends/test_lowering.py` checks them against each other.

On CUDA the integer GEMM is not decomposed: `q4.linear_w4a4` runs its CUDA kernel, the Triton
GEMM of `kernels/triton_gemm.py` (rotation and quantize still fuse, as Inductor's own Triton
code). The `kernels="triton"` option (`Q4_KERNELS=triton`) runs the Triton GEMM on any device,
in Triton's interpreter on CPU, with the graph otherwise lowered as usual.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from qcompile.kernels import cpu_kernels, ops, reference, rotation
from qcompile.kernels.ops import int_matmul  # importing ops registers torch.ops.q4
from qcompile.kernels.reference import epilogue

q4 = torch.ops.q4


def quantize_per_tensor_decomposed(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """`q4::quantize_per_tensor` in ATen ops (same rounding: half to even)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.to(torch.float32) / step), -qmax - 1, qmax).to(torch.int8)


def unpack_int4_decomposed(packed: torch.Tensor, k: int) -> torch.Tensor:
    """`kernels.int4.unpack_int4` as one elementwise loop Inductor can generate: every byte is
    read twice (a broadcast), shifted left by 4 for its even k and 0 for its odd k, then right
    by 4 (arithmetic, on int8: the sign extension)."""
    n, kp = packed.shape
    pairs = packed.view(torch.int8)[:, :, None].expand(n, kp, 2)
    left = 4 - 4 * torch.arange(2, dtype=torch.int8, device=packed.device)  # [4, 0]
    codes = torch.bitwise_right_shift(torch.bitwise_left_shift(pairs, left), 4).reshape(n, 2 * kp)
    return codes if 2 * kp == k else codes[:, :k]


GEMM_COLUMNS = 8192  # wider linears run in column blocks of this many outputs


def linear_w4a4_decomposed(x_codes: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, a_step: torch.Tensor,
                           bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`q4::linear_w4a4` as unpack + integer GEMM + the one epilogue.

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
        acc = int_matmul(x2, unpack_int4_decomposed(w_packed[rows], k))
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
                                  a_step: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> Any:
    """The CPU decomposition: the q4_cpu kernel at decode, else the GEMM one; on other devices the
    op stays (its Triton kernel)."""
    if x_codes.device.type != "cpu":
        return NotImplemented
    if cpu_kernels.use_for(static_rows(x_codes), cpu_kernels.SMALL_M):
        return torch.ops.q4_cpu.linear_w4a4.default(x_codes, w_packed, w_step, a_step, bias, out_dtype,
                                                    cpu_kernels.FORCE_SCALAR)
    return linear_w4a4_decomposed(x_codes, w_packed, w_step, a_step, bias, out_dtype)


def linear_w4a16_decomposed(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor, bias: torch.Tensor | None,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """`q4::linear_w4a16` as its unfused form: the weight dequantized in x's dtype (one loop
    Inductor generates from the packed bytes), then aten.linear (the same values as the op's
    own fallback, `kernels.ops.linear_w4a16_dequantized`)."""
    codes = unpack_int4_decomposed(w_packed, x.shape[-1])
    w = (codes.to(torch.float32) * w_step[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias).to(out_dtype)


def linear_w4a16_decomposed_on_cpu(x: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor,
                                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> Any:
    """The CPU decomposition of the weight-only linear: q4_cpu at decode, else dequantize + linear."""
    if x.device.type != "cpu":
        return NotImplemented
    if cpu_kernels.use_for(static_rows(x), cpu_kernels.SMALL_M_W4A16):
        return torch.ops.q4_cpu.linear_w4a16.default(x, w_packed, w_step, bias, out_dtype, cpu_kernels.FORCE_SCALAR)
    return linear_w4a16_decomposed(x, w_packed, w_step, bias, out_dtype)


DECOMPOSITIONS: dict[Any, Callable] = {
    q4.rotate.default: rotation.rotate_decomposed,
    q4.quantize_per_tensor.default: quantize_per_tensor_decomposed,
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


def use_triton_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module like `gm` (sharing its constants) whose integer GEMMs call the Triton
    kernel on every device: `q4.linear_w4a4` -> `q4.linear_w4a4_triton`. On CPU that is Triton's
    interpreter, which must be on before triton is first imported: this turns it on if triton
    is not imported yet, and otherwise asks for TRITON_INTERPRET=1 at the start."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError("kernels='triton' (Q4_KERNELS) on CPU runs Triton's interpreter, which must be on "
                               "before triton is imported: start the process with TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is q4.linear_w4a4.default:
            node.target = q4.linear_w4a4_triton.default
    return fx.GraphModule(gm, graph)


class SourceStamp(CustomGraphPass):
    """A post-grad pass that changes nothing, for its uuid: a hash of the sources that decide the
    code Inductor generates from a q4 graph (these decompositions and the kernels they call).
    Inductor's and AOTAutograd's cache keys hash the graph before the decompositions run, so
    without it an edited decomposition would replay code compiled from the old one (seen while
    benchmarking this module); the uuid is part of both keys."""

    SOURCES = (__file__, rotation.__file__, cpu_kernels.__file__, ops.__file__, reference.__file__,
               str(cpu_kernels.SOURCE))

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        digest = hashlib.sha256()
        for path in self.SOURCES:
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()


def lower(gm: fx.GraphModule, example_inputs: list[Any], how: str, kernels: str, mode: str | None) -> Callable:
    """The callable that runs the final graph: `how` is "inductor" or "eager"; `kernels` "auto"
    (the integer GEMMs decomposed for Inductor on CPU, Triton kernels on CUDA) or "triton"."""
    if kernels == "triton":
        gm = use_triton_kernels(gm)
    if how == "eager":
        return gm
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    if any(str(node.target).startswith(("q4.linear_w4a4", "q4.linear_w4a16", "q4.rotate")) for node in gm.graph.nodes):
        # a cached compile (Inductor's FX graph cache, a saved artifact) runs code calling q4_cpu ops
        # without tracing the decompositions that load them: load them first (0.1 s once built)
        cpu_kernels.load()
    patches = torch._inductor.list_mode_options(mode) if mode else {}
    # no stride asserts in the generated wrapper: Dynamo's guards check the inputs already, and a
    # SmolLM2 decode step made ~1000 of them (0.4 µs each, 0.4 ms of an 11.6 ms step)
    patches["size_asserts"] = False
    if torch._inductor.config.post_grad_custom_post_pass is None:  # a user's own pass stays
        patches["post_grad_custom_post_pass"] = SourceStamp()
    with torch._inductor.config.patch(patches):
        return compile_fx(gm, example_inputs)  # with DECOMPOSITIONS, registered above
