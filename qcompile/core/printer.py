"""A readable text form of a qcompile graph: one line per node, one line per quantized linear.

    print(format_graph(artifact.graph_module, module="model.layers.0"))

This is what the print and dump switches show (`Q4_PRINT_AFTER_ALL`, `Q4_DUMP_DIR`, ...,
`qcompile.core.instrument.ir_text`). The start of SmolLM2-135M's first decoder layer after the
`w4a4` recipe, on a 6-token prompt (`tests/golden/smollm2_decoder_layer.txt` holds the whole
layer)::

    # module model.layers.0: 63 of 186 nodes (123 outside it left out); quantized linears: 7 W4A4 int; float linears: 0
    model.layers.0.input_layernorm:
      %to_6: f32[1, 6, 576] = aten.to(%embedding, f32)                              # modeling_llama.py:64
      %pow_1: f32[1, 6, 576] = aten.pow(%to_6, 2)                                   # modeling_llama.py:65
      %mean: f32[1, 6, 1] = aten.mean(%pow_1, [-1], True)                           # modeling_llama.py:65
      %add_3: f32[1, 6, 1] = aten.add(%mean, 1e-05)                                 # modeling_llama.py:66
      %rsqrt: f32[1, 6, 1] = aten.rsqrt(%add_3)                                     # modeling_llama.py:66
      %mul_3: f32[1, 6, 576] = aten.mul(%to_6, %rsqrt)                              # modeling_llama.py:66
      %to_7: f32[1, 6, 576] = aten.to(%mul_3, f32)                                  # modeling_llama.py:67
      %mul_4: f32[1, 6, 576] = aten.mul(const model.layers.0.input_layernorm.weight:migrated f32[576], %to_7)  # modeling_llama.py:67
    model.layers.0.self_attn:
      %rotate_default: f32[1, 6, 576] = q4.rotate(%mul_4, [const rotation_576_0 f32[9, 9], const rotation_576_1 f32[64, 64]])  # modeling_llama.py:244
      %linear_w4a4_default: f32[1, 6, 576] = linear W4A4 int(%rotate_default: f32[1, 6, 576], w[576, 576]) {w_step min 0.00741 med 0.0186 max 0.0848, a_step 0.063}  # model.layers.0.self_attn.q_proj  modeling_llama.py:244
    ...

How to read it:

- The first line counts the nodes and the quantized linears by format.
- `%name: TYPE = op(args)`: the node's name, its value's dtype and shape (from `meta["val"]`;
  a symbolic size prints as its symbol, `f32[1, s27, 576]`), its target in short form
  (`aten.mul`, `q4.quantize_per_tensor`: namespace and op name, no overload), its arguments.
  Types are left out where the graph records none (a graph traced without fake values).
- Constants (`get_attr`) get no line of their own: they are written where they are read, as
  `const NAME TYPE`, NAME being the user's parameter name (`model.layers.0.mlp.up_proj.weight`)
  where the constant is one, with what a pass made of it after a colon (`...weight:rotated`,
  `...weight:migrated`), otherwise the attribute name (`rotation_576_0`). A one-element constant
  also shows its value.
- A quantized linear is ONE line, `linear FORMAT(%x: TYPE, w[N, K], bias TYPE) {scales}`, whatever
  nodes it is made of (the forms `qcompile.core.qlinear.match` recognizes):

      W4A4 int / W4A8 int   q4.linear_w4a4 (the integer kernel) on codes of q4.quantize_per_tensor
                            with 4 / 8 bits
      W4A4 fake-quant       aten.linear(q4.dequantize_per_tensor(q4.quantize_per_tensor(x)),
                            q4.dequantize_weight_int4(...)) as insert-quantizers leaves it
      W4A16                 aten.linear(x, q4.dequantize_weight_int4(...)): weight-only
      W4A4 int dynamic      either form with a step per token computed at run time (q4.token_steps)
      FP4 e2m1/e3m0 int     either form with a 4-bit float (LLM-FP4) on either side: the formats of
                            the weight / the activation codes (`int8`: 8-bit integer activations)

  `{w_step min .. med .. max .., a_step ..}` summarizes the weight's per-output-channel steps
  (the median is the lower middle one) and the activation's per-tensor step (`a_step 0.063, first
  token 8-bit 0.41`: each sequence's first token has a step and codes of its own, see
  insert-quantizers' `sinks`; `groups of 32 x1..15`: each group of 32 k of a row steps by an
  integer multiple of the row's step, these the smallest and largest, see `w-group`). The nodes that
  only feed that linear (the weight's dequantize, the activation's dequantize, the constants)
  get no lines. The activation's `q4.quantize_per_tensor` gets none either when only quantized
  linears read it (q/k/v share one): the line then names the float activation the quantize
  reads, `%x`, and its bits are in the format. A quantize that anything else reads keeps its
  line, and the linears name it (`%quantize_per_tensor_default: i8[...]`) as their input.
- Float linears (`aten.linear` with a float weight constant) print as ordinary nodes, with
  why insert-quantizers left them in float (`q4_float_reason`) in their comment.
- Numbers (steps, float arguments) have 3 significant digits, so the text is stable across
  machines and runs; file names are base names (`modeling_llama.py:244`), never paths.
- Lines are grouped under the module that made them (`model.layers.0.self_attn:`); a linear's
  nodes go under the module holding the `nn.Linear`, and its line ends with its own module path
  and source line (`# model.layers.0.self_attn.q_proj  modeling_llama.py:244`); other lines end
  with their source line. Comments start at column 80 where the line is shorter (a fixed column,
  so a diff of one line never moves another's). Nodes without a module (inputs, outputs) are
  under `graph:`.

`provenance=True` adds which pass created each node and from which nodes (`q4_provenance`):
`[by fuse-kernels from linear_default_1, dequantize_per_tensor_default_1, ...]`. `module=` prints
only the nodes whose module path is that module or inside it, after a first line saying how
many were left out: one layer of a big model.
"""  # noqa: E501 (the example is the printer's own output, one line per node)

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from qcompile.core import ir, qlinear

__all__ = ["format_graph"]

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", torch.complex64: "c64", torch.complex128: "c128",
}
_COMMENT_COLUMN = 80  # where a node line's `# source` comment starts (indentation included)


def format_graph(gm: fx.GraphModule, *, provenance: bool = False, module: str | None = None) -> str:
    """The text of `gm` described in this module's docstring (it ends with a newline).

    provenance  append `[by PASS from NODES]` to the nodes a pass created
    module      print only the nodes of this module path and the modules inside it
    """
    return _Printer(gm, provenance).text(module)


# --- values and arguments ------------------------------------------------------------------------


def _num(value: float) -> str:
    """3 significant digits; an integral float keeps a '.0' so it reads as a float."""
    text = f"{value:.3g}"
    return text + ".0" if re.fullmatch(r"-?\d+", text) else text


def _dtype(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def _tensor_type(dtype: torch.dtype, shape: Any) -> str:
    return f"{_dtype(dtype)}[{', '.join(str(d) for d in shape)}]"


def _type(value: Any) -> str | None:
    """`f32[1, s0, 576]` for a tensor (symbolic sizes as their symbols), a tuple of those, the
    symbol or expression of a symbolic int; None when unknown."""
    if isinstance(value, torch.Tensor):
        return _tensor_type(value.dtype, value.shape)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_type(v) or "?" for v in value) + ")"
    if isinstance(value, (bool, int, float)):
        return type(value).__name__
    return None


def _scalar(value: Any) -> str:
    return _num(value) if isinstance(value, float) else str(value)


def _target(node: fx.Node) -> str:
    """`aten.mul`, `q4.rotate`, `getitem`, `torch.relu`: short, without the overload."""
    target = node.target
    if node.op == "call_method":
        return f".{target}"
    if node.op == "call_module":
        return f"module[{target}]"
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.replace("::", ".")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.replace("::", ".")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    name = getattr(target, "__name__", None) or str(target)
    owner = getattr(target, "__module__", None) or ""
    if owner in ("_operator", "operator", "builtins", "math"):
        return name
    if owner.startswith("torch") and getattr(torch, name, None) is target:
        return f"torch.{name}"
    return f"{owner}.{name}" if owner else name


def _source(node: fx.Node) -> str:
    """`modeling_llama.py:244`: the base name and line of the user line behind `node`, or ''."""
    match = re.match(r"(.+):(\d+) in ", ir.source_line(node))
    if not match:
        return ""
    base = re.split(r"[/\\]", match.group(1))[-1]
    return f"{base}:{match.group(2)}"


def _is_linear_module(node: fx.Node) -> bool:
    """Whether the innermost module that made `node` is an `nn.Linear` (class or its name)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    cls = list(stack.values())[-1][1]
    if isinstance(cls, type):
        return issubclass(cls, torch.nn.Linear)
    return str(cls).rsplit(".", 1)[-1].rstrip("'>") == "Linear"


# --- quantized linears ---------------------------------------------------------------------------


def _format(q: qlinear.QLinear) -> str:
    """`W4A4 int`, `W4A8 fake-quant`, `W4A16`; `W4A? int` when the codes' bits are unknown; with a
    4-bit float on either side, the formats of weight / activation: `FP4 e2m1/e3m0 int`."""
    if q.form == qlinear.WEIGHT_ONLY:
        return "W4A16"
    bits = q.a_bits if q.a_bits is not None else "?"
    kind = ("int" if q.fused else "fake-quant") + (" dynamic" if q.dynamic else "")
    return f"FP4 {q.float_formats} {kind}" if q.float_formats else f"W4A{bits} {kind}"


# --- the printer ---------------------------------------------------------------------------------


class _Printer:
    def __init__(self, gm: fx.GraphModule, provenance: bool):
        self.gm, self.provenance = gm, provenance
        self.nodes = list(gm.graph.nodes)
        # the quantized linears, each printed as one line
        self.linears = {n: q for n in self.nodes if (q := qlinear.match(n)) is not None and q.quantized}
        self.hidden = self._folded()

    def _folded(self) -> set[fx.Node]:
        """The helper nodes that only feed quantized linears: printed as part of their lines."""
        hidden: set[fx.Node] = set()
        for q in self.linears.values():
            for helper in (q.w_dq, q.x_dq):
                if helper is not None and all(user is q.node for user in helper.users):
                    hidden.add(helper)
        for quant in {q.quant for q in self.linears.values() if q.quant is not None}:
            if all(user in hidden or (user in self.linears and self.linears[user].fused)
                   for user in quant.users):
                hidden.add(quant)
        for q in self.linears.values():  # where(sinks, sink_step, step): printed in the steps
            if q.sink_steps is not None and all(user in hidden or user in self.linears for user in q.a_step.users):
                hidden.add(q.a_step)
        return hidden

    # -- pieces

    def constant(self, node: fx.Node) -> str:
        try:
            value = ir.get_constant(self.gm, node)
        except AttributeError:  # a broken graph: the attribute is gone
            return f"const {node.target} (missing)"
        text = f"const {self._constant_name(node)}"
        if value is None:
            return text
        text += " " + _type(value)
        if value.numel() == 1:
            text += f" ({_scalar(value.item())})"
        return text

    @staticmethod
    def _constant_name(node: fx.Node) -> str:
        fqn, target = node.meta.get(ir.FQN), str(node.target)
        if not fqn:
            return target
        stem = re.sub(r"[^0-9a-zA-Z_]", "_", fqn)
        if target == stem or re.fullmatch(re.escape(stem) + r"_\d+", target):
            return fqn
        if target.startswith(stem + "_"):
            return f"{fqn}:{target[len(stem) + 1:]}"
        return target

    def arg(self, a: Any) -> str:
        if isinstance(a, fx.Node):
            return self.constant(a) if a.op == "get_attr" else f"%{a.name}"
        if isinstance(a, tuple):
            return "(" + ", ".join(self.arg(x) for x in a) + ("," if len(a) == 1 else "") + ")"
        if isinstance(a, list):
            return "[" + ", ".join(self.arg(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {self.arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, torch.dtype):
            return _dtype(a)
        if isinstance(a, float):
            return _num(a)
        if isinstance(a, (torch.layout, torch.memory_format)):
            return str(a).removeprefix("torch.")
        if isinstance(a, torch.device):
            return str(a)
        if isinstance(a, str):
            return repr(a)
        if isinstance(a, torch.Tensor):
            return f"tensor {_type(a)}"
        return str(a)

    def type_of(self, node: Any) -> str | None:
        """The node's type from its fake value (every node a pass creates has one: `ir.mark_created`);
        a constant's from its tensor."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            try:
                return _type(ir.get_constant(self.gm, node))
            except AttributeError:
                return None
        return _type(ir.fake_value(node))

    def _step_values(self, step: Any) -> torch.Tensor | None:
        try:
            value = ir.get_constant(self.gm, step)
        except AttributeError:
            return None
        return value.detach().float().reshape(-1) if isinstance(value, torch.Tensor) and value.numel() else None

    def linear_text(self, q: qlinear.QLinear) -> str:
        # what the line names as the activation: the float input of a folded quantize
        x = q.input
        if q.x_dq is not None and q.x_dq in self.hidden:
            x = q.quant if q.quant is not None else q.x_dq.args[0]
        if q.quant is not None and q.quant in self.hidden:
            x = q.quant.args[0]
        x_text = self.arg(x)
        if isinstance(x, fx.Node) and x.op != "get_attr" and (x_type := self.type_of(x)):
            x_text += f": {x_type}"
        steps = self._step_values(q.w_step)
        try:
            packed = ir.get_constant(self.gm, q.packed)
        except AttributeError:
            packed = None
        n = steps.numel() if steps is not None else (packed.shape[0] if packed is not None else "?")
        k = q.k
        if k is None:  # the fused op: K is the codes' last dimension
            codes = ir.fake_value(q.input)
            if codes is None and q.quant is not None:
                codes = ir.fake_value(q.quant.args[0])
            k = codes.shape[-1] if isinstance(codes, torch.Tensor) else "?"
        parts = [x_text, f"w[{n}, {k}]"]
        if q.bias is not None:
            constant = isinstance(q.bias, fx.Node) and q.bias.op == "get_attr"
            bias_type = self.type_of(q.bias) if constant else None
            parts.append(f"bias {bias_type}" if bias_type else f"bias {self.arg(q.bias)}")
        scales = []
        if steps is not None:
            ordered = steps.sort().values
            median = ordered[(ordered.numel() - 1) // 2]
            scales.append(f"w_step min {_num(ordered[0].item())} med {_num(median.item())} "
                          f"max {_num(ordered[-1].item())}")
        elif isinstance(q.w_step, fx.Node):
            scales.append(f"w_step {self.arg(q.w_step)}")
        mult = self._step_values(q.w_mult) if q.w_mult is not None else None
        if mult is not None and isinstance(k, int):
            groups = ir.get_constant(self.gm, q.w_mult).shape[1]
            scales.append(f"groups of {k // groups} x{int(mult.min())}..{int(mult.max())}")
        if q.sink_steps is not None:
            first, rest = (self._step_values(step) for step in q.sink_steps)
            if first is not None and rest is not None and first.numel() == rest.numel() == 1:
                scales.append(f"a_step {_num(rest.item())}, first token {q.sink_bits}-bit {_num(first.item())}")
            else:
                scales.append(f"a_step {self.arg(q.a_step)}")
        elif q.a_step is not None:
            a_steps = self._step_values(q.a_step)
            a_text = _num(a_steps[0].item()) if a_steps is not None and a_steps.numel() == 1 else self.arg(q.a_step)
            scales.append(f"a_step {a_text}")
        return f"linear {_format(q)}({', '.join(parts)}) {{{', '.join(scales)}}}"

    def line(self, node: fx.Node) -> str:
        q = self.linears.get(node)
        if node.op == "placeholder":
            body = "input"
        elif node.op == "output":
            return f"return {self.arg(node.args[0])}"
        elif q is not None:
            body = self.linear_text(q)
        else:
            args = [self.arg(a) for a in node.args] + [f"{k}={self.arg(v)}" for k, v in node.kwargs.items()]
            body = f"{_target(node)}({', '.join(args)})"
        node_type = self.type_of(node)
        text = f"%{node.name}" + (f": {node_type}" if node_type else "") + f" = {body}"
        if self.provenance and ir.PROVENANCE in node.meta:
            made = node.meta[ir.PROVENANCE]
            sources = made.get("from") or []
            text += f"  [by {made.get('pass')}" + (f" from {', '.join(sources)}]" if sources else "]")
        is_linear = qlinear.is_linear(node)
        comment = [ir.module_path(node)] if is_linear and ir.module_path(node) else []
        if source := _source(node):
            comment.append(source)
        if q is None and is_linear and ir.FLOAT_REASON in node.meta:
            comment.append(f"float: {node.meta[ir.FLOAT_REASON]}")
        if not comment:
            return text
        # comments start at a fixed column where the line is short enough: readable, and a
        # change to one line never moves another line's comment
        return text + " " * max(2, _COMMENT_COLUMN - 2 - len(text)) + "# " + "  ".join(comment)

    def section(self, node: fx.Node) -> str:
        """The module a node's line is listed under: its own, or for an nn.Linear's nodes the
        module holding the linear (the linear's line names the linear itself)."""
        path = ir.module_path(node)
        if path and _is_linear_module(node):
            path = path.rpartition(".")[0]
        return path

    # -- the whole text

    def text(self, module: str | None) -> str:
        shown = [n for n in self.nodes if n.op != "get_attr" and n not in self.hidden]
        if module is None:
            lines = [f"# graph: {len(shown)} nodes; {self.summary(shown)}"]
        else:
            inside = [n for n in shown if (p := ir.module_path(n)) == module or p.startswith(module + ".")]
            if not inside:
                tops = sorted({".".join(p.split(".")[:2]) for n in shown if (p := ir.module_path(n))})
                return (f"# module {module}: no node of this graph of {len(shown)} nodes is in it "
                        f"(its modules start with: {', '.join(tops) or 'none recorded'})\n")
            lines = [f"# module {module}: {len(inside)} of {len(shown)} nodes "
                     f"({len(shown) - len(inside)} outside it left out); {self.summary(inside)}"]
            shown = inside
        current = None
        for node in shown:
            section = self.section(node)
            if section != current:
                lines.append(f"{section or 'graph'}:")
                current = section
            lines.append("  " + self.line(node))
        return "\n".join(lines) + "\n"

    def summary(self, nodes: list[fx.Node]) -> str:
        """`quantized linears: 7 W4A4 int; float linears: 0` over `nodes`."""
        forms: dict[str, int] = {}
        floats = 0
        for n in nodes:
            if n in self.linears:
                form = _format(self.linears[n])
                forms[form] = forms.get(form, 0) + 1
            elif qlinear.is_linear(n):
                floats += 1
        if not forms and not floats:
            return "no linears"
        counts = ", ".join(f"{count} {form}" for form, count in sorted(forms.items()))
        return f"quantized linears: {counts or 'none'}; float linears: {floats}"
