"""qcompile.core.printer: one line per node, ONE line per quantized linear; provenance, module filter,
print-after-change diffs, and the print/dump instruments built on it."""

from __future__ import annotations

import io
import re

import pytest
import torch

import qcompile.backends.q4 as q4_backend
import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from qcompile.core import instrument, ir
from qcompile.core.config import resolve_options
from qcompile.core.instrument import DumpIR, PrintIR, ir_text
from qcompile.core.pass_manager import PassManager
from qcompile.core.printer import format_graph
from tests.helpers.models import tiny_llama
from tests.helpers.passes import tiny_graph

pytestmark = pytest.mark.usefixtures("toy_passes")  # the toy passes are registered for each test

q4 = torch.ops.q4
EAGER = {"lower": "eager", "progress": False}
# one quantized linear line: name, type, format, input, weight shape, scales, module path, source
LINEAR = re.compile(
    r"^  %(?P<name>\w+): f32\[(?P<out>[^\]]*)\] = linear (?P<form>W4A\d+(?: int| fake-quant)?)"
    r"\(%(?P<x>\w+): f32\[(?P<in>[^\]]*)\], w\[(?P<n>\d+), (?P<k>\d+)\](?P<bias>, bias f32\[\d+\])?\) "
    r"\{w_step min (?P<min>\S+) med (?P<med>\S+) max (?P<max>[^,}]+)"
    r"(?:, groups of (?P<group>\d+) x(?P<mult_min>\d+)\.\.(?P<mult_max>\d+))?"
    r"(?:, a_step (?P<a_step>[^,}]+)(?:, first token (?P<sink_bits>\d)-bit (?P<sink_step>[^}]+))?)?\}"
    r"(?P<provenance>  \[by [^\]]+\])?"
    r"  # (?P<module>[\w.]+)(?:  (?P<source>\S+\.py:\d+))?$"
)


def ids(seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, seq), generator=g)


def compiled_graph(options: dict, *calls: torch.Tensor, dynamic: bool | None = None, model=None):
    """The final graph module of tiny_llama compiled with backend q4 and called on `calls`."""
    model = model or tiny_llama()
    compiled = torch.compile(model, backend="q4", dynamic=dynamic,
                             options={**EAGER, "calibration": [{"input_ids": ids(16, 7)}], **options})
    with torch.no_grad():
        for x in calls or (ids(16),):
            compiled(input_ids=x)
    return q4_backend.compiled_graphs()[-1].graph_module


@pytest.fixture(scope="module")
def w4a4_graph():
    """tiny_llama through the default recipe (w4a4: rotation, GPTQ, fused kernels, W4A8 head)."""
    torch._dynamo.reset()
    return compiled_graph({})


def linear_lines(text: str) -> dict[str, re.Match]:
    """{module path: match} of every quantized linear line; fails on a malformed one."""
    found = {}
    for line in text.splitlines():
        if "= linear W4A" in line:
            match = LINEAR.match(line)
            assert match, f"not a well-formed quantized linear line:\n{line}"
            found[match["module"]] = match
    return found


# --- quantized linears ---------------------------------------------------------------------------


def test_a_fused_linear_is_one_line_with_bits_scales_and_source(w4a4_graph):
    gm = w4a4_graph
    text = format_graph(gm)
    linears = linear_lines(text)
    assert len(linears) == 15 and text.count("= linear W4A") == 15
    assert {m["form"] for name, m in linears.items() if name != "lm_head"} == {"W4A4 int"}
    assert linears["lm_head"]["form"] == "W4A8 int"  # the recipe's second insert-quantizers run
    assert re.fullmatch(r"# graph: \d+ nodes; quantized linears: 14 W4A4 int, 1 W4A8 int; float linears: 0",
                        text.splitlines()[0])

    q_proj = linears["model.layers.0.self_attn.q_proj"]
    assert (q_proj["out"], q_proj["in"], q_proj["n"], q_proj["k"]) == ("1, 16, 64", "1, 16, 64", "64", "64")
    assert re.fullmatch(r"modeling_llama\.py:\d+", q_proj["source"])  # a base name, not a path
    # the scales are the graph's: the fused node's weight step and activation step constants
    node = next(n for n in gm.graph.nodes if n.name == q_proj["name"])
    assert node.target is q4.linear_w4a4.default and q_proj["x"] == node.args[0].args[0].name
    w_step = ir.get_constant(gm, node.args[2]).sort().values
    assert [q_proj["min"], q_proj["med"], q_proj["max"]] == [
        f"{w_step[0].item():.3g}", f"{w_step[(len(w_step) - 1) // 2].item():.3g}", f"{w_step[-1].item():.3g}"]
    # ... and its group multipliers: groups of 32 k, the smallest and largest multiplier
    w_mult = ir.get_constant(gm, node.kwargs["w_mult"])
    assert (q_proj["group"], q_proj["mult_min"], q_proj["mult_max"]) == (
        "32", str(int(w_mult.min())), str(int(w_mult.max())))
    # the default recipe steps each sequence's first token apart: where(sinks, sink_step, step)
    sink_step, a_step = node.args[3].args[1:]
    assert q_proj["a_step"] == f"{ir.get_constant(gm, a_step).item():.3g}"
    assert (q_proj["sink_bits"], q_proj["sink_step"]) == ("8", f"{ir.get_constant(gm, sink_step).item():.3g}")
    # the nodes folded into the linears' lines print nowhere
    assert not re.search(r"q4\.quantize_per_tensor|q4\.dequantize|get_attr|const \S*(_packed|_step|_mult)", text)
    # other constants print where they are read, under the user's parameter name
    assert "aten.embedding(const model.embed_tokens.weight f32[256, 64], %" in text
    assert "const model.layers.0.input_layernorm.weight:migrated f32[64]" in text


def test_fake_quant_and_weight_only_forms(w4a4_graph):
    x = torch.randn(1, 16, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    forms = {}
    for pipeline in ("insert-quantizers{skip=}", "insert-quantizers{skip=,a-bits=8},fuse-kernels",
                     "insert-quantizers{skip=,a-bits=16},fuse-kernels"):
        gm = PassManager(pipeline, stream=io.StringIO()).run(capture(model, x)).graph_module
        text = format_graph(gm)
        forms[pipeline] = sorted(m["form"] for m in linear_lines(text).values())
        assert text.count("= linear W4A") == 2 and "q4.dequantize" not in text
    assert list(forms.values()) == [["W4A4 fake-quant"] * 2, ["W4A8 int"] * 2, ["W4A16"] * 2]
    weight_only = linear_lines(text)["0"]
    assert weight_only["a_step"] is None and weight_only["bias"] == ", bias f32[32]"
    assert weight_only["x"] == next(n.name for n in gm.graph.nodes if n.op == "placeholder")  # the float input


def test_a_quantize_read_by_other_nodes_keeps_its_line():
    x = torch.randn(1, 16, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    gm = PassManager("insert-quantizers{skip=},fuse-kernels", stream=io.StringIO()).run(capture(model, x)).graph_module
    quant = next(n for n in gm.graph.nodes if n.target is q4.quantize_per_tensor.default)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        extra = gm.graph.call_function(torch.ops.aten.abs.default, (quant,))
    output.args = ((*output.args[0], extra),) if isinstance(output.args[0], tuple) else ((output.args[0], extra),)
    text = format_graph(gm)
    assert re.search(rf"%{quant.name}: i8\[1, 16, 64\] = q4\.quantize_per_tensor\(%\w+, const \S+ f32\[\] \(\S+\), 4\)",
                     text)
    (line,) = [line for line in text.splitlines() if "= linear W4A4 int(" in line]
    assert f"(%{quant.name}: i8[1, 16, 64], w[32, 64], bias f32[32])" in line  # the codes, not the float input


def test_float_linears_say_why_they_are_float():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    gm = PassManager("insert-quantizers{skip=0}", stream=io.StringIO()).run(capture(model, torch.randn(2, 8))).graph_module
    (line,) = [line for line in format_graph(gm).splitlines() if "aten.linear" in line]
    assert re.match(r"  %linear: f32\[2, 8\] = aten\.linear\(%\w+, const 0\.weight f32\[8, 8\], const 0\.bias f32\[8\]\)",
                    line)
    assert line.endswith("# 0  float: its module path matches skip='0'")


def test_symbolic_sizes_print_as_their_symbols():
    gm = compiled_graph({"recipe": "w4a4-rtn"}, ids(16), dynamic=True)
    text = format_graph(gm)
    match = re.search(r"%embedding: f32\[1, (s\d+), 64\]", text)
    assert match, text[:2000]
    assert "= linear W4A4 int(%mul_" in text and f"f32[1, {match[1]}, 64], w[64, 64])" in text


# --- provenance and the module filter ------------------------------------------------------------


def test_provenance_only_on_request(w4a4_graph):
    plain, with_provenance = format_graph(w4a4_graph), format_graph(w4a4_graph, provenance=True)
    assert "[by " not in plain
    linears = linear_lines(with_provenance)
    assert linears["model.layers.0.mlp.up_proj"]["provenance"].startswith("  [by fuse-kernels from linear_default_")
    assert re.search(r"= q4\.rotate\(.*\)  \[by rotate-inputs from linear_\d+", with_provenance)
    # nodes no pass created have no provenance; the aten ops passes make are o_proj's migration
    # multiply and the first-token mask of the quantizers (`sinks`)
    assert set(re.findall(r"= aten\.(\w+)\(.*\[by ([\w-]+)", with_provenance)) == {
        ("mul", "migrate-scales"), ("eq", "insert-quantizers"), ("slice", "insert-quantizers"),
        ("expand_as", "insert-quantizers")}
    assert len(with_provenance.splitlines()) == len(plain.splitlines())


def test_module_filter_prints_one_module_and_says_what_it_left_out(w4a4_graph):
    full = format_graph(w4a4_graph)
    text = format_graph(w4a4_graph, module="model.layers.1.mlp")
    first, *body = text.splitlines()
    total = int(re.match(r"# graph: (\d+) nodes", full)[1])
    assert first == (f"# module model.layers.1.mlp: 7 of {total} nodes ({total - 7} outside it left out); "
                     "quantized linears: 3 W4A4 int; float linears: 0")
    assert set(linear_lines(text)) == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    sections = [line for line in body if not line.startswith("  ")]
    assert sections == ["model.layers.1.mlp:", "model.layers.1.mlp.act_fn:", "model.layers.1.mlp:"]
    assert all(line in full for line in body if line.startswith("  "))  # the same lines as in the whole
    # a module is a dotted prefix, not a string prefix: model.layers.1 is not in model.layers.10
    assert "model.layers.0" not in format_graph(w4a4_graph, module="model.layers.1")
    missing = format_graph(w4a4_graph, module="model.layer.0")
    assert missing.startswith("# module model.layer.0: no node") and "model.layers" in missing


def test_the_text_is_deterministic_and_machine_independent(w4a4_graph):
    text = format_graph(w4a4_graph, provenance=True)
    assert text == format_graph(w4a4_graph, provenance=True)
    assert not re.search(r"0x[0-9a-f]{6,}|/work/|site-packages|\\", text)
    numbers = re.findall(r"(?<![\w.\[])\d+\.\d+(?:e-\d+)?", text)
    assert numbers and all(len(n.split("e")[0].replace(".", "").lstrip("0")) <= 3 for n in numbers)


# --- the instruments ------------------------------------------------------------------------------


def test_print_after_change_prints_unified_diffs_of_changed_passes_only(capfd):
    compiled_graph({"recipe": "w4a4-rtn", "print_after_change": True})
    err = capfd.readouterr().err
    headers = [line for line in err.splitlines() if line.startswith("// -----//")]
    # analyze-outliers and fold-scales change nothing on Llama: no text for them
    assert headers == [
        "// -----// IR Diff After insert-quantizers{w-bits=4,a-bits=4,skip=lm_head,only=,search-clip=false,"
        "unmatched=quantize,rounding=true,weights=rtn,w-format=int,a-format=int,low-rank=0,activations=static,"
        "sinks=false,sink-bits=8,w-group=0} //----- //",
        "// -----// IR Diff After fuse-kernels //----- //",
    ]
    fuse = err.split(headers[1])[1].splitlines()
    assert fuse[1:3] == ["--- before fuse-kernels", "+++ after fuse-kernels"]
    removed = [line for line in fuse if line.startswith("-  %")]
    added = [line for line in fuse if line.startswith("+  %")]
    assert len([line for line in removed if "= linear W4A4 fake-quant(" in line]) == 14
    assert len([line for line in added if "= linear W4A4 int(" in line]) == 14
    assert any(line.startswith("@@ ") for line in fuse)
    assert "IR Dump" not in err  # diffs, not whole graphs


def test_print_provenance_option_reaches_print_and_dump(tmp_path):
    options = resolve_options({"print_after_all": True, "dump_dir": str(tmp_path), "print_provenance": True},
                              environ={})
    stream = io.StringIO()
    manager = PassManager.from_options("test-add-node", options, stream=stream)
    assert [i.provenance for i in manager.instruments if isinstance(i, (PrintIR, DumpIR))] == [True, True]
    manager.run(tiny_graph())
    assert "%neg = torch.neg(%add)  [by test-add-node from add]" in stream.getvalue()
    (dumped,) = tmp_path.iterdir()
    assert dumped.name == "000-test-add-node.txt" and "[by test-add-node from add]" in dumped.read_text()
    assert resolve_options(None, environ={"Q4_PRINT_PROVENANCE": "1"}).print_provenance
    plain = PassManager.from_options("test-add-node", resolve_options({"print_after_all": True}, environ={}),
                                     stream=io.StringIO())
    assert not plain.instruments[0].provenance


def test_ir_text_falls_back_for_a_graph_the_printer_cannot_print(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot print")

    monkeypatch.setattr(instrument, "format_graph", broken)
    text = ir_text(tiny_graph())
    assert text.startswith("# qcompile.core.printer failed (RuntimeError: cannot print); torch.fx's form follows\n")
    assert "torch.relu" in text
