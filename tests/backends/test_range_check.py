"""The run-time range check (qcompile/backends/range_check.py): the lowered graph's extra output,
and when it warns. The user's view (a call 50x outside, warned once, outputs unchanged) is in the
bad-input catalogue (tests/examples/test_bad_inputs.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx

import qcompile.kernels.ops  # noqa: F401  (defines torch.ops.q4)
from qcompile.backends import range_check
from qcompile.core import ir

q4 = torch.ops.q4


def _graph() -> fx.GraphModule:
    """x -> quantize(x, 0.5) (calibrated max |x| 3.5) -> dequantize -> (y,)"""
    root = torch.nn.Module()
    root.register_buffer("a_step", torch.tensor(0.5))
    graph = fx.Graph()
    x, step = graph.placeholder("x"), graph.get_attr("a_step")
    x_q = graph.call_function(q4.quantize_per_tensor.default, (x, step, 4))
    x_q.meta[ir.CALIBRATED_RANGE] = 3.5
    graph.output((graph.call_function(q4.dequantize_per_tensor.default, (x_q, step, torch.float32)),))
    return fx.GraphModule(root, graph)


def test_the_monitored_graph_also_returns_each_quantizers_range_over_its_calibrated_one():
    gm = _graph()
    monitored, monitor = range_check.monitored(gm, "0")
    targets = [str(n.target) for n in monitored.graph.nodes if n.op == "call_function"]
    # the check right after its quantizer (run eagerly, x is not kept to the end of the graph)
    # into one tensor made at the first site: no small tensor per site kept to the end
    assert targets == ["q4.quantize_per_tensor.default", "aten.new_empty.default", "aten.aminmax.default",
                       "<built-in function getitem>", "<built-in function getitem>", "aten.neg.default",
                       "aten.maximum.default", "aten._to_copy.default", "aten.div.Scalar", "aten.select.int",
                       "aten.copy_.default", "q4.dequantize_per_tensor.default"]
    x = torch.tensor([[1.0, -7.0], [0.5, 2.0]])
    y, ratios = monitored(x)
    assert torch.equal(y, gm(x)[0]) and torch.equal(ratios, torch.tensor([2.0]))  # 7 / 3.5
    assert len(monitor.sites) == 1
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] == [targets[0], targets[-1]]  # gm unchanged


def test_the_ratios_lowered_through_inductor_are_the_eager_ones():
    """Inductor lowers `aminmax(x)` (no dim) and the copies into the ratio tensor to what eager
    computes: one ratio over all of x, a NaN kept (an ATen reduction with no dims once meant
    "none" under Inductor: a ratio per element)."""
    from torch._inductor.compile_fx import compile_fx

    monitored, _ = range_check.monitored(_graph(), "0")
    for x in (torch.tensor([[1.0, -7.0], [0.5, 2.0]]), torch.randn(3, 5, 8), torch.tensor([[float("nan"), 1.0]])):
        lowered = compile_fx(monitored, [x])(x)[-1]
        assert lowered.shape == (1,), lowered
        torch.testing.assert_close(lowered, monitored(x)[-1], rtol=0, atol=0, equal_nan=True)


def test_a_graph_without_static_quantizers_is_not_monitored():
    gm = _graph()
    for node in gm.graph.nodes:
        node.meta.pop(ir.CALIBRATED_RANGE, None)
    assert range_check.monitored(gm, "0") == (gm, None)


@pytest.mark.parametrize("ratios, warns", [([1.0, 3.9], False), ([1.0, 4.5], True), ([float("nan"), 1.0], True),
                                           ([float("inf"), 0.0], True)])
def test_it_warns_past_four_times_the_calibrated_range_or_on_non_finite_values(ratios, warns):
    monitor = range_check.RangeMonitor("3", ["a.q_proj", "a.down_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = monitor.split((torch.ones(1), torch.tensor(ratios)))
        monitor.split((torch.ones(1), torch.tensor(ratios)))
    assert len(outputs) == 1
    said = [str(w.message) for w in caught]
    assert len(said) == (1 if warns else 0)  # once, not at every call
    if warns:
        assert "graph 3 went far outside" in said[0]
        assert ("4.5x" in said[0]) if 4.5 in ratios else ("non-finite" in said[0])


def test_on_a_gpu_the_ratios_are_checked_once_their_copy_has_landed_never_waiting_for_it(monkeypatch):
    """Not at the call (a wait for the GPU at every call), not at the next (a wait for the last
    one): a host copy is started right after the call and read at a later call that finds it landed."""
    monitor = range_check.RangeMonitor("5", ["a.q_proj"])
    copies, landed = [], [False]

    def copy_to_host(ratios):
        copies.append(ratios)
        return torch.tensor([9.0]), lambda: landed[0]  # what the copy will hold

    monkeypatch.setattr(monitor, "_copy_to_host", copy_to_host)
    on_gpu = torch.empty(1, device="meta")  # any tensor not on the CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert monitor.split((torch.ones(1), on_gpu)) == (torch.ones(1),)
        monitor.split((torch.ones(1), on_gpu))  # the copy is still in flight: no check, no second copy
        assert len(copies) == 1 and not caught
        landed[0] = True
        monitor.split((torch.ones(1), on_gpu))  # landed: checked (9x: warns), and this call's copy started
    assert len(copies) == 2
    assert len(caught) == 1 and "a.q_proj (9.0x)" in str(caught[0].message)
