"""scale_search's output error, measured a block of weight rows at a time."""

from __future__ import annotations

import pytest
import torch

from qcompile.algorithms import scale_search
from qcompile.kernels import rotation


@pytest.mark.parametrize("rotated", [False, True])
def test_the_output_error_in_blocks_of_rows_is_the_error_of_the_whole_weight(monkeypatch, rotated):
    """Rows round independently, so blocks of 40 rows (an lm_head whole made ~400 MiB of
    temporaries per clip) give the whole weight's error to float32's rounding, and the same clip."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g) * torch.linspace(0.1, 4, 32)
    weights = [torch.randn(100, 32, generator=g), torch.randn(30, 32, generator=g).half()]
    scales = torch.rand(32, generator=g) + 0.5
    factors = rotation.rotation_factors(32) if rotated else None
    whole = [scale_search.output_error(x, weights, scales, c, 4, 4, factors) for c in scale_search.CLIPS]
    monkeypatch.setattr(scale_search, "BLOCK_ROWS", 40)
    blocked = [scale_search.output_error(x, weights, scales, c, 4, 4, factors) for c in scale_search.CLIPS]
    assert blocked == pytest.approx(whole, rel=1e-5)
    assert scale_search.search_clip(x, weights, scales, scale_search.CLIPS, 4, 4, factors)[0] == \
        scale_search.CLIPS[min(range(len(whole)), key=whole.__getitem__)]
