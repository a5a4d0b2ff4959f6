"""The pass manager and its instruments, on tiny traced graphs and the toy passes of `tests.helpers.passes`."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.core.config import resolve_options
from qcompile.core.instrument import DumpIR, Memory, PrintIR, Statistics, Timing, VerifyEach
from qcompile.core.pass_api import PipelineError
from qcompile.core.pass_manager import PassFailure, PassManager
from qcompile.core.pipeline import parse_pipeline
from qcompile.core.verify import VerificationError
from tests.helpers.passes import tiny_graph

pytestmark = pytest.mark.usefixtures("toy_passes")  # the toy passes are registered for each test

ADD = "test-add-node{count=1,mode=fast,flag=false,label=x}"  # how headers name test-add-node


def run(pipeline: str, *instruments):
    """(result, printed text) of running `pipeline` on the tiny graph."""
    stream = io.StringIO()
    result = PassManager(parse_pipeline(pipeline), list(instruments), stream=stream).run(tiny_graph())
    return result, stream.getvalue()


def headers(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("// -----//")]


def test_run_returns_the_graph_and_one_record_per_pass():
    result, printed = run("test-noop,test-add-node{count=2}")
    assert printed == ""
    assert str(result.graph_module.graph).count("torch.neg") == 2
    assert torch.equal(result.graph_module(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 3.0]))
    noop, add = result.records
    assert (noop.name, noop.options, noop.modified, noop.stats) == ("test-noop", "", False, {"nodes-seen": 4})
    assert (add.name, add.options, add.modified, add.stats) == (
        "test-add-node", "count=2,mode=fast,flag=false,label=x", True, {"nodes-added": 2})
    assert add.seconds >= 0


def test_each_run_starts_with_fresh_statistics():
    manager = PassManager("test-noop", stream=io.StringIO())
    assert manager.run(tiny_graph()).records[0].stats == manager.run(tiny_graph()).records[0].stats


def test_print_after_all_prints_every_pass_and_stage():
    stream = io.StringIO()
    manager = PassManager(parse_pipeline("test-noop,test-add-node"), [PrintIR(after_all=True)], stream=stream)
    manager.on_stage("capture", tiny_graph())
    manager.run(tiny_graph())
    assert headers(stream.getvalue()) == [
        "// -----// IR Dump After capture //----- //",
        "// -----// IR Dump After test-noop //----- //",
        f"// -----// IR Dump After {ADD} //----- //",
    ]
    last = stream.getvalue().split(headers(stream.getvalue())[-1])[1]
    assert "%neg = torch.neg(%add)" in last and "return %neg" in last  # qcompile.core.printer's text


def test_print_after_change_prints_a_diff_for_changed_passes_only():
    _, printed = run("test-noop,test-add-node,test-add-node{count=0}", PrintIR(after_change=True))
    assert headers(printed) == [f"// -----// IR Diff After {ADD} //----- //"]
    diff = printed.split(headers(printed)[0])[1].splitlines()[1:]
    assert diff[:2] == [f"--- before {ADD}", f"+++ after {ADD}"]
    assert "+  %neg = torch.neg(%add)" in diff and "-  return %add" in diff and "+  return %neg" in diff


def test_print_after_change_with_print_after_all_prints_stages_whole_and_passes_as_diffs():
    stream = io.StringIO()
    manager = PassManager(parse_pipeline("test-noop,test-add-node"),
                          [PrintIR(after_all=True, after_change=True)], stream=stream)
    manager.on_stage("capture", tiny_graph())
    manager.run(tiny_graph())
    assert headers(stream.getvalue()) == ["// -----// IR Dump After capture //----- //",
                                          f"// -----// IR Diff After {ADD} //----- //"]


def test_print_after_change_with_print_after_diffs_only_the_named_passes():
    _, printed = run("test-add-node{count=0},test-noop,test-add-node{count=2}",
                     PrintIR(after=["test-add-node"], after_change=True))
    # test-noop is not named; the first test-add-node changed nothing
    assert headers(printed) == ["// -----// IR Diff After test-add-node{count=2,mode=fast,flag=false,label=x} //----- //"]
    assert printed.count("+  %neg") == 2


def test_print_before_and_after_a_named_pass():
    _, printed = run("test-noop,test-add-node,test-noop", PrintIR(before=["test-add-node"], after=["test-noop"]))
    assert headers(printed) == [
        "// -----// IR Dump After test-noop //----- //",
        f"// -----// IR Dump Before {ADD} //----- //",
        "// -----// IR Dump After test-noop //----- //",
    ]
    before_add = printed.split(headers(printed)[1])[1].split("// -----//")[0]
    assert "torch.neg" not in before_add


def test_print_of_an_unknown_pass_lists_registered_passes():
    with pytest.raises(PipelineError, match="unknown pass 'test-nop'.*test-noop"):
        PrintIR(after=["test-nop"])


def test_dump_dir_has_one_file_per_stage_in_order(tmp_path):
    manager = PassManager(parse_pipeline("test-noop,test-add-node{count=2}"), [DumpIR(tmp_path / "dump")])
    manager.on_stage("capture", tiny_graph())
    manager.on_stage("normalize", tiny_graph())
    manager.run(tiny_graph())
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["000-capture.txt", "001-normalize.txt", "002-test-noop.txt", "003-test-add-node.txt"]
    capture = (tmp_path / "dump" / "000-capture.txt").read_text()
    assert capture.startswith("# IR after stage capture\n") and "torch.relu" in capture
    added = (tmp_path / "dump" / "003-test-add-node.txt").read_text()
    assert added.startswith("# IR after pass test-add-node{count=2,mode=fast,flag=false,label=x} (changed)\n")
    assert added.count("torch.neg") == 2


def test_dump_dir_keeps_the_graph_a_failing_pass_left(tmp_path):
    manager = PassManager(parse_pipeline("test-noop,test-fail"), [DumpIR(tmp_path)])
    with pytest.raises(PassFailure):
        manager.run(tiny_graph())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-test-noop.txt", "001-test-fail-failed.txt"]
    assert "# ValueError: boom" in (tmp_path / "001-test-fail-failed.txt").read_text()


def test_verify_each_skips_passes_that_report_no_change():
    # The pass breaks an invariant but says it changed nothing: verification is skipped (MLIR).
    result, _ = run("test-break-provenance{modified=false}", VerifyEach())
    assert not result.records[0].modified


def test_verify_each_checks_passes_that_report_a_change():
    with pytest.raises(PassFailure) as e:
        run("test-noop,test-break-provenance{modified=true}", VerifyEach())
    assert isinstance(e.value.__cause__, VerificationError)
    message = str(e.value)
    assert "pass test-break-provenance{modified=true} failed" in message
    assert "provenance-names-a-registered-pass" in message and "'no-such-pass'" in message
    assert "at node: %relu" in message  # the verifier's node
    run("test-break-provenance{modified=true}")  # without VerifyEach nobody looks


def test_timing_table():
    _, printed = run("test-noop,test-add-node", Timing())
    assert "Pass execution timing report" in printed
    table = printed.splitlines()
    assert table[1].split() == ["#", "pass", "seconds", "%"]
    assert [row.split()[1] for row in table[3:5]] == ["test-noop", "test-add-node"]
    assert table[5].split()[0] == "total" and table[5].split()[-1] == "100.0"


def test_statistics_table():
    _, printed = run("test-noop,test-add-node{count=3},test-fail{at=nowhere}", Statistics())
    assert "Pass statistics report" in printed
    rows = [line.split() for line in printed.splitlines()[3:]]
    assert rows == [["0", "test-noop", "nodes-seen", "4"], ["1", "test-add-node", "nodes-added", "3"]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_table_says_which_step_raised_the_peak():
    """Stages and passes each get a row (calibration: what ran between "freeze" and the first
    pass); 256 MB past the peak so far, touched and freed during "freeze", raise the process's
    peak there, not later."""
    stream = io.StringIO()
    graph = tiny_graph()
    manager = PassManager(parse_pipeline("test-noop,test-add-node"), [Memory()], stream=stream)
    manager.on_stage("capture", graph)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    above = (int(status["VmHWM"].split()[0]) - int(status["VmRSS"].split()[0])) * 1024  # earlier tests' peak
    big = torch.ones((above + 2**28) // 4)  # 256 MB past the process's peak so far
    del big
    manager.on_stage("freeze", graph)
    manager.run(graph)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "// -----// Memory report (resident MiB) //----- //"
    rows = [line.split() for line in lines[3:]]
    assert [row[0] for row in rows] == ["capture", "freeze", "calibrate", "0", "1"]
    capture_peak, freeze_peak = float(rows[0][2]), float(rows[1][2])
    assert rows[1][-2:] == ["peak", "rose"] and freeze_peak > capture_peak + 200
    assert all(row[-1] != "rose" for row in rows[:1] + rows[2:])


def test_failure_names_pass_node_source_previous_passes_and_reproducer():
    stream = io.StringIO()
    manager = PassManager(parse_pipeline("test-noop,test-add-node{count=2},test-fail,test-noop"),
                          [PrintIR(after_failure=True)], stream=stream)
    with pytest.raises(PassFailure) as e:
        manager.run(tiny_graph())
    assert isinstance(e.value.__cause__, ValueError)
    assert str(e.value).splitlines() == [
        "pass test-fail failed",
        "  at node: %relu = call_function[relu] (from model.py:12 in forward: return torch.relu(x) + 1)",
        "  after passes: test-noop, test-add-node{count=2}",
        "  error: ValueError: boom",
        "  reproduce with: Q4_PIPELINE='test-noop,test-add-node{count=2},test-fail'",
    ]
    assert e.value.previous == ["test-noop", "test-add-node{count=2}"]
    assert headers(stream.getvalue()) == ["// -----// IR Dump After test-fail{at=relu} Failed //----- //"]
    assert stream.getvalue().count("torch.neg") == 2  # the graph the failing pass saw


def test_failure_of_the_first_pass_without_a_known_node():
    with pytest.raises(PassFailure) as e:
        run("test-returns-none")
    message = str(e.value)
    assert isinstance(e.value.__cause__, TypeError)
    assert "at node" not in message and "(it was the first pass)" in message
    assert "'test-returns-none' returned None, not a PassResult" in message


def test_from_options_builds_the_requested_instruments(tmp_path):
    options = resolve_options({"print_after": "test-noop", "dump_dir": str(tmp_path), "timing": True,
                               "stats": True, "memory": True}, environ={})
    stream = io.StringIO()
    manager = PassManager.from_options("test-noop", options, stream=stream)
    assert [type(i) for i in manager.instruments] == [PrintIR, DumpIR, VerifyEach, Timing, Statistics, Memory]
    assert all(i.stream is stream for i in manager.instruments if hasattr(i, "rows"))
    manager.run(tiny_graph())
    assert "IR Dump After test-noop" in stream.getvalue() and "timing report" in stream.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["000-test-noop.txt"]


def test_from_options_defaults_only_verify():
    manager = PassManager.from_options(parse_pipeline(""), resolve_options(None, environ={}))
    assert [type(i) for i in manager.instruments] == [VerifyEach]
    assert manager.run(tiny_graph()).records == []


def test_a_user_pass_failing_inside_torch_compile_names_itself_and_the_reproducer():
    # `test-fail` is registered outside qcompile (tests/helpers/passes.py), like any user's pass.
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    compiled = torch.compile(model, backend="q4", options={
        "pipeline": "analyze-outliers,test-fail{at=linear},fuse-kernels", "calibration": [(x,)],
        "lower": "eager", "progress": False})
    with pytest.raises(Exception) as e, torch.no_grad():
        compiled(x)
    # Dynamo wraps what the backend raised (BackendCompilerFailed): its message keeps ours.
    assert isinstance(getattr(e.value, "inner_exception", e.value), PassFailure)
    message = str(e.value)
    assert "pass test-fail{at=linear} failed" in message and "at node: %linear" in message
    assert "error: ValueError: boom" in message
    assert "reproduce with: Q4_PIPELINE='analyze-outliers,test-fail{at=linear}'" in message
