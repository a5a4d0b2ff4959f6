"""GPTQ weight rounding: better layer output than round-to-nearest, same format, and the Gram
matrix it needs is accumulated by calibration only when asked and follows migration."""

from __future__ import annotations

import pytest
import torch

from qcompile.algorithms import gptq
from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.api.testing import capture
from qcompile.core import ir
from qcompile.core.memory import SpilledTensor
from qcompile.core.pass_api import get_pass_class
from qcompile.kernels import int4
from tests.helpers.models import inputs, tiny_model


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Tokens of one fixed distribution (correlated channels, three outliers); `seed` draws the tokens."""
    mixing = torch.eye(k) + 0.2 * torch.randn(k, k, generator=torch.Generator().manual_seed(100))
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed)) @ mixing
    x[:, :3] *= 20  # outlier channels, as migrated weights see them
    return x


def output_sqnr_db(x, weight, codes, step) -> float:
    reference = x @ weight.t()
    error = reference - x @ (codes.float() * step[:, None]).t()
    return 10 * torch.log10(reference.pow(2).sum() / error.pow(2).sum()).item()


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    x = correlated_inputs(2048, 96)
    held_out = correlated_inputs(512, 96, seed=1)
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    codes, step = gptq.quantize_gptq(weight, x.t() @ x, bits=4)
    rtn_codes, rtn_step = int4.quantize_weight_per_channel(weight, 4)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape and step.shape == (40,)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    gain = output_sqnr_db(held_out, weight, codes, step) - output_sqnr_db(held_out, weight, rtn_codes, rtn_step)
    assert gain > 3.0, gain


def test_gptq_handles_dead_channels_and_odd_k():
    x = correlated_inputs(256, 33)
    x[:, 5] = 0  # never active in calibration
    weight = torch.randn(7, 33, generator=torch.Generator().manual_seed(3))
    codes, step = gptq.quantize_gptq(weight, x.t() @ x, bits=3)
    assert torch.isfinite(step).all() and (step > 0).all()
    assert int(codes.min()) >= -4 and int(codes.max()) <= 3
    assert (codes[:, 5] == 0).all()


@pytest.mark.parametrize("scale", [1e-21, 1e16])
def test_gptq_does_not_depend_on_the_scale_of_the_inputs(scale):
    """Inputs of 1e-19 (products of projections of small values, found by tests/fuzz) made a Gram
    matrix of 1e-38 whose Cholesky factorization failed ('not positive-definite'); 1e-21 here."""
    x = correlated_inputs(256, 33)
    weight = torch.randn(7, 33, generator=torch.Generator().manual_seed(3))
    codes, step = gptq.quantize_gptq(weight, x.t() @ x)
    scaled = (x.double() * scale).t() @ (x.double() * scale)
    assert torch.equal(gptq.quantize_gptq(weight, scaled.float())[0], codes)


def test_gram_is_accumulated_only_when_asked_and_follows_migration():
    x = torch.randn(2, 5, 8)
    stats = ChannelStats.empty(8, gram=True)
    stats.update(x)
    rows = x.reshape(-1, 8)
    torch.testing.assert_close(stats.gram, rows.t() @ rows)
    assert ChannelStats.empty(8).gram is None
    s = torch.rand(8) + 0.5
    scaled = stats.scaled(s)
    torch.testing.assert_close(scaled.gram, (rows / s).t() @ (rows / s))
    torch.testing.assert_close(scaled.samples, stats.samples / s)


def test_insert_quantizers_asks_for_the_gram_and_uses_it():
    cls = get_pass_class("insert-quantizers")
    gptq_pass = cls(cls.parse_options({"weights": "gptq"}))
    assert gptq_pass.calibration_needs() == {"gram"} and cls().calibration_needs() == set()

    gm = capture(tiny_model("llama"), inputs(), pipeline="insert-quantizers{weights=gptq}")
    linears = [n for n in gm.graph.nodes if n.target is ir.aten.linear.default and ir.CALIB in n.meta]
    assert linears and all(n.meta[ir.CALIB].gram is not None for n in linears)
    # calibration is over: each Gram matrix waits in a file, read back at each `gram`
    assert all(isinstance(n.meta[ir.CALIB].observed_gram, SpilledTensor) for n in linears)
    result = gptq_pass(gm)
    assert result.modified and gptq_pass.stats["weights-gptq"] == gptq_pass.stats["linears-quantized"] > 0


def group_scaled_weight(n: int, k: int, group: int, seed: int = 3) -> torch.Tensor:
    """A weight whose groups of `group` columns have magnitudes 30x apart: what one step per row
    rounds badly and a step per group does not."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, k // group)[torch.randperm(k // group, generator=g)]
    return torch.randn(n, k, generator=g) * scales.repeat_interleave(group)


def grouped_values(codes, mult, group):
    return codes.float() * mult.float().repeat_interleave(group, dim=1)


def test_grouped_steps_are_integer_multiples_of_the_row_step_and_beat_one_step_a_row():
    x = correlated_inputs(2048, 96)
    held_out = correlated_inputs(512, 96, seed=1)
    weight = group_scaled_weight(40, 96, 32)
    codes, base, mult = gptq.quantize_gptq(weight, x.t() @ x, bits=4, group=32)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert mult.dtype == torch.uint8 and mult.shape == (40, 3) and int(mult.min()) >= 1 and int(mult.max()) <= 15
    assert base.shape == (40,) and torch.equal(base, weight.abs().amax(dim=1) / (7 * 15))
    values = grouped_values(codes, mult, 32)
    grouped = output_sqnr_db(held_out, weight, values, base)
    per_row = output_sqnr_db(held_out, weight, *gptq.quantize_gptq(weight, x.t() @ x, bits=4))
    rtn_codes, rtn_base, rtn_mult = gptq.quantize_grouped(weight, 32)
    rtn = output_sqnr_db(held_out, weight, grouped_values(rtn_codes, rtn_mult, 32), rtn_base)
    assert grouped > per_row + 3.0 and grouped > rtn + 1.0, (grouped, per_row, rtn)


def test_group_multipliers_minimize_each_groups_rounding_error():
    weight = group_scaled_weight(8, 64, 32)
    base, mult = gptq.group_multipliers(weight, 32)
    for row in range(8):
        for g in range(2):
            w = weight[row, 32 * g : 32 * (g + 1)]
            errors = [((torch.round(w / (base[row] * m)).clamp(-8, 7) * base[row] * m - w).pow(2).sum().item(), m)
                      for m in range(1, 16)]
            assert min(errors)[1] == int(mult[row, g])
    zero = gptq.group_multipliers(torch.zeros(2, 64), 32)
    assert torch.equal(zero[0], torch.ones(2)) and torch.equal(zero[1], torch.ones(2, 2, dtype=torch.uint8))


def test_a_group_that_does_not_divide_k_is_refused():
    with pytest.raises(ValueError, match="group 32 does not divide K = 40"):
        gptq.group_multipliers(torch.randn(4, 40), 32)


@pytest.mark.parametrize("group", [0, 32])
def test_rows_rounded_by_blocks_equal_all_rows_at_once(group, monkeypatch):
    """GPTQ rounds a wide weight (an lm_head) by blocks of rows, each row on its own: the same
    codes and steps as one block of every row."""
    x = correlated_inputs(256, 64)
    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    whole = gptq.quantize_gptq(weight, x.t() @ x, 4, group=group)
    monkeypatch.setattr(gptq, "ROWS", 16)
    blocks = gptq.quantize_gptq(weight, x.t() @ x, 4, group=group)
    assert len(whole) == len(blocks) and all(torch.equal(a, b) for a, b in zip(whole, blocks))
