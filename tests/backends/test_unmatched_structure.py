"""Bad input for migration: structure no rule matches still compiles; an option decides whether
those linears are quantized without migration or kept in float, and the report says which and why."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.backend import EAGER, compile_and_run
from tests.helpers.models import ids, tiny_model


class Unknown(torch.nn.Module):
    """No norm before the first linear (relu of the input) and a residual reading the second's input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.a(torch.relu(x))
        return self.b(h) + h[..., :8]


def test_unknown_structure_compiles_and_the_option_decides():
    x = torch.randn(2, 5, 16)
    expected = Unknown()(x)
    _, out, art = compile_and_run(Unknown(), {**EAGER, "recipe": "w4a4", "calibration": [(x,)]}, x)
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 2  # quantized without migration
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.9
    report = art.migration_report()
    assert sum(" unmatched " in line for line in report.splitlines()) == 2, report
    assert "no norm, producing linear or attention value absorbs" in report and "also feeds" in report

    _, out, art = compile_and_run(Unknown(), {**EAGER, "recipe": "w4a4", "unmatched": "float",
                                              "calibration": [(x,)]}, x)
    assert art.count_ops(torch.ops.q4.linear_w4a4.default) == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert art.migration_report().count("unmatched=float") == 2


@pytest.mark.slow
def test_post_norm_bert_keeps_unmatched_linears_in_float_on_request():
    model = tiny_model("bert")
    calibration = [{"input_ids": ids(12, seed=4, batch=2)}]
    _, _, quantized = compile_and_run(model, {**EAGER, "recipe": "w4a4", "calibration": calibration}, ids(12))
    _, _, kept = compile_and_run(model, {**EAGER, "recipe": "w4a4", "unmatched": "float",
                                         "calibration": calibration}, ids(12))
    assert quantized.count_ops(torch.ops.q4.linear_w4a4.default) == 13
    report = kept.migration_report()
    rows = [line.split() for line in report.splitlines()[2:]]
    migrated = sum(" migrated " in line for line in report.splitlines())
    float_rows = [row for row in rows if row[1] == "float"]
    # BERT's post-norm residual reads the norm output, so q/k/v and the intermediate dense keep
    # their scales; the attention output dense migrates through the value rows
    assert migrated == 2 and len(float_rows) == 13 - 2, report
    assert kept.count_ops(torch.ops.q4.linear_w4a4.default) == 2


def test_all_zero_calibration_channels_do_not_divide_by_zero():
    model = Unknown()
    x = torch.randn(2, 5, 16)
    x[..., 3:9] = 0  # channels calibration never sees active
    _, out, art = compile_and_run(model, {**EAGER, "recipe": "w4a4", "calibration": [(x,)]}, torch.randn(2, 5, 16))
    assert torch.isfinite(out).all()
    for name, value in art.graph_module.named_buffers():
        assert torch.isfinite(value.float()).all(), name
