"""CalibrationCache: graphs of one model and calibration share statistics and memo; a process that
uses calibration after calibration keeps only the most recent ones (bounded memory)."""

from __future__ import annotations

import gc

import torch

from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.frontend.calibrate import CalibrationCache


def stats() -> ChannelStats:
    return ChannelStats.empty(4, gram=True)


def test_graphs_of_one_calibration_share_statistics_and_memo():
    cache, weight, calibration = CalibrationCache(), torch.zeros(3, 4), [{"input_ids": torch.zeros(1, 2)}]
    s = stats()
    cache.put(weight, calibration, True, s)
    assert cache.get(weight, calibration, True) is s
    assert cache.get(weight, calibration, False) is None  # without Gram matrices: another entry
    assert cache.get(weight, [{"input_ids": torch.zeros(1, 2)}], True) is None  # another calibration object
    assert cache.memo_for([weight], calibration) is cache.memo_for([weight], calibration)
    assert cache.memo_for([weight], None) is not cache.memo_for([weight], calibration)


def test_only_the_most_recent_calibrations_are_kept():
    cache, weight = CalibrationCache(), torch.zeros(3, 4)
    calibrations = [[{"input_ids": torch.full((1, 2), i)}] for i in range(4)]
    for c in calibrations[:2]:
        cache.put(weight, c, True, stats())
        cache.memo_for([weight], c)
    kept = cache.get(weight, calibrations[0], True)
    assert kept is not None  # ... and the first is now the most recently used
    cache.put(weight, calibrations[2], True, stats())  # evicts the second, the least recent
    assert cache.get(weight, calibrations[1], True) is None
    assert cache.get(weight, calibrations[0], True) is kept and cache.get(weight, calibrations[2], True) is not None
    memo = cache.memo_for([weight], calibrations[3])
    assert cache.memo_for([weight], calibrations[3]) is memo
    for table in (cache._by_weight, cache._memos):
        assert len(table[weight]) <= CalibrationCache.MAX_CALIBRATIONS


def test_statistics_die_with_the_weight():
    cache, weight, calibration = CalibrationCache(), torch.zeros(3, 4), [1]
    cache.put(weight, calibration, False, stats())
    cache.memo_for([weight], calibration)
    del weight
    gc.collect()
    assert len(cache._by_weight) == 0 and len(cache._memos) == 0
