"""A mixture of experts' grouped GEMMs through the backend: calibrated from batches (the eager
observer sees transformers' fallback op and torch._grouped_mm), quantized, fused, and lowered by
Inductor to the same numbers as the eager graph."""

from __future__ import annotations

import pytest
import torch

from qcompile.frontend.calibrate import observe_model
from tests.helpers.backend import counting_backend
from tests.helpers.models import Experts, expert_inputs, experts_case

q4 = torch.ops.q4


@pytest.mark.parametrize("aten", [False, True])
def test_calibration_batches_observe_the_grouped_gemms_inputs(aten):
    model, x, offs = experts_case(aten)
    stats = observe_model(model, [(x, offs)], {model.gate_up_proj: "gate_up_proj", model.down_proj: "down_proj"})
    assert set(stats) == {"gate_up_proj", "down_proj"}
    # every expert's rows pooled: the per-channel absmax of the whole input
    torch.testing.assert_close(stats["gate_up_proj"].absmax.float(), x.float().abs().amax(dim=0))
    assert stats["down_proj"].absmax.shape == (model.down_proj.shape[-1],)


def test_inductor_lowering_equals_the_eager_graph():
    model = Experts().eval()
    x, offs = expert_inputs()
    outs = {}
    for lower in ("eager", "inductor"):
        backend, graphs = counting_backend({"pipeline": "insert-quantizers,fuse-kernels", "lower": lower,
                                            "calibration": [(x, offs)], "progress": False})
        torch._dynamo.reset()
        with torch.no_grad():
            outs[lower] = torch.compile(model, backend=backend)(x, offs)
        assert graphs[-1].count_ops(q4.grouped_linear_w4a4) == 2
    torch._dynamo.reset()
    torch.testing.assert_close(outs["inductor"], outs["eager"], rtol=1e-5, atol=1e-5)
