"""ChannelStats keeps each sequence's first token (its attention sink) apart: `sinks` and `rest_absmax`."""

from __future__ import annotations

import dataclasses

import torch

from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.kernels.rotation import rotate, rotation_factors


def _batches(count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = torch.randn(2, 40, 8, generator=g)
        x[:, 0, 3] = 500.0  # the sink's massive channel
        batches.append(x)
    return batches


def test_first_rows_are_kept_apart_and_the_rest_is_stepped_without_them():
    stats = ChannelStats.empty(8, gram=True)
    batches = _batches()
    for x in batches:
        stats.update(x)
    firsts = torch.cat([x[:, 0] for x in batches])
    assert torch.equal(stats.sinks, firsts)
    assert torch.equal(stats.sink_absmax, firsts.abs().amax(0))
    rest = torch.cat([x[:, 1:].reshape(-1, 8) for x in batches])
    assert torch.equal(stats.rest_absmax, rest.abs().amax(0))
    assert stats.absmax[3] == 500.0 and stats.rest_absmax[3] < 10  # absmax still covers every row
    assert not (stats.samples.abs() == 500.0).any()  # the samples stand for the rest
    all_rows = torch.cat([x.reshape(-1, 8) for x in batches])
    torch.testing.assert_close(stats.gram, all_rows.T @ all_rows)  # GPTQ weighs the sinks too
    assert stats.num_tokens == all_rows.shape[0]


def test_rows_without_a_sequence_dim_have_no_sinks():
    stats = ChannelStats.empty(8)
    stats.update(torch.randn(30, 8))
    assert stats.sinks.shape == (0, 8) and stats.sink_absmax is None
    assert torch.equal(stats.rest_absmax, stats.absmax)


def test_sinks_follow_rotation_scaling_and_splitting():
    stats = ChannelStats.empty(8)
    for x in _batches():
        stats.update(x)
    factors = rotation_factors(8)
    rotated = stats.rotated(factors)
    torch.testing.assert_close(rotated.sinks, rotate(stats.sinks, factors))
    assert torch.equal(rotated.rest_absmax, rotated.absmax)  # both from the rotated samples
    scales = torch.arange(1.0, 9.0)
    scaled = stats.scaled(scales)
    assert torch.equal(scaled.sinks, stats.sinks / scales) and torch.equal(scaled.rest_absmax, stats.rest_absmax / scales)
    index, multiplier = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 7]), torch.tensor([1, 1, 1, 0.5, 1, 1, 1, 1])
    split = stats.split(index, multiplier)
    assert torch.equal(split.sinks, (stats.sinks * multiplier)[:, index])
    assert torch.equal(split.rest_absmax, (stats.rest_absmax * multiplier)[index])


def test_transformed_stats_compute_their_gram_from_the_observed_one_when_read():
    """Migrated, rotated and split statistics hold no Gram matrix of their own (a pass over every
    linear would copy them all): they share the observed one and compute theirs, to the same bits
    as the transformations applied right away."""
    stats = ChannelStats.empty(8, gram=True)
    for x in _batches():
        stats.update(x)
    factors, scales = rotation_factors(8), torch.arange(1.0, 9.0)
    index, multiplier = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 7]), torch.tensor([1, 1, 1, 0.5, 1, 1, 1, 1])
    derived = stats.scaled(scales).rotated(factors).split(index, multiplier)
    assert derived.observed_gram is stats.observed_gram
    expected = stats.gram / torch.outer(scales, scales)
    expected = rotate(rotate(expected, factors).t().contiguous(), factors).t()
    expected = (expected * torch.outer(multiplier, multiplier))[index][:, index]
    assert torch.equal(derived.gram, expected)
    assert ChannelStats.empty(8).scaled(scales).rotated(factors).gram is None


def test_a_packed_gram_keeps_its_upper_triangle_and_reads_as_the_whole_matrix():
    """Calibration accumulates the Gram matrix as its upper triangle, half the bytes (a matrix
    given whole is packed by `pack_gram`, as the calibration cache does); read, it is the whole
    symmetric matrix, also through derived statistics."""
    stats = ChannelStats.empty(8, gram=True)
    given = dataclasses.replace(ChannelStats.empty(8), observed_gram=torch.zeros(8, 8))
    for x in _batches():
        stats.update(x)
        given.update(x)
    assert stats.observed_gram.shape == (8 * 9 // 2,)
    whole = given.gram
    assert torch.equal(whole, whole.t())
    torch.testing.assert_close(stats.gram, whole, rtol=1e-6, atol=0)  # the same sums, blocked otherwise
    factors, scales = rotation_factors(8), torch.arange(1.0, 9.0)
    derived_whole = given.scaled(scales).rotated(factors).gram
    given.pack_gram()
    given.pack_gram()  # once packed, left alone
    assert given.observed_gram.shape == (8 * 9 // 2,)
    assert torch.equal(given.gram, whole)
    assert torch.equal(given.scaled(scales).rotated(factors).gram, derived_whole)


def test_the_calibration_cache_holds_packed_grams():
    from qcompile.frontend.calibrate import CalibrationCache

    stats, weight, calibration = ChannelStats.empty(8, gram=True), torch.randn(4, 8), [object()]
    for x in _batches():
        stats.update(x)
    whole = stats.gram
    cache = CalibrationCache()
    cache.put(weight, calibration, True, stats)
    cached = cache.get(weight, calibration, True)
    assert cached.observed_gram.dim() == 1 and torch.equal(cached.gram, whole)
