"""GPTQ weight rounding: better layer output than round-to-nearest, same format, and the Gram
matrix it needs is accumulated by calibration only when asked and follows migration."""

from __future__ import annotations

import torch

from qcompile.algorithms import gptq
from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.api.testing import capture
from qcompile.core import ir
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
    result = gptq_pass(gm)
    assert result.modified and gptq_pass.stats["weights-gptq"] == gptq_pass.stats["linears-quantized"] > 0
