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


class _Attention(torch.nn.Module):
    """q, k and v read one input; `o` reads k's output, except on calls with `other` (then v reads it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, x, other=False):
        h = x * 2
        q, k = self.q(h), self.k(h)
        v = self.v(k if other else h)
        return self.o(q + k + v)


def _own_stats(module, batches, gram=True):
    """Every linear's stats observed on its own: what sharing must reproduce exactly."""
    from qcompile.frontend.calibrate import observe_model

    watched = {m.weight: name for name, m in module.named_children()}
    return observe_model(module, batches, watched, gram=gram, share=False)


def test_linears_reading_one_input_share_one_stats_object():
    """q, k and v read the same tensor: one ChannelStats (one Gram matrix), equal to each's own."""
    from qcompile.frontend.calibrate import observe_model

    module, batches = _Attention(), [(torch.randn(2, 5, 4),) for _ in range(3)]
    watched = {m.weight: name for name, m in module.named_children()}
    shared = observe_model(module, batches, watched, gram=True)
    assert shared["q"] is shared["k"] is shared["v"] and shared["o"] is not shared["q"]
    own = _own_stats(module, batches)
    for name in own:
        for field in ("absmax", "robust", "samples", "observed_gram", "sinks", "rest_absmax"):
            assert torch.equal(getattr(shared[name], field), getattr(own[name], field)), (name, field)


def test_a_linear_that_reads_another_input_later_gets_stats_of_its_own():
    """v read q's input on the first batch and k's output on a later one: sharing is refused
    (`_SharedInputDiverged`; the backend's `_observe` then calibrates again with share=False),
    never stats of inputs v did not read."""
    from qcompile.frontend import calibrate

    module, batches = _Attention(), [(torch.randn(2, 5, 4),), (torch.randn(2, 5, 4), True)]
    watched = {m.weight: name for name, m in module.named_children()}
    try:
        calibrate.observe_model(module, batches, watched, gram=True)
        raise AssertionError("sharing was not checked")
    except calibrate._SharedInputDiverged:
        pass
    own = _own_stats(module, batches)
    assert own["v"] is not own["q"] and not torch.equal(own["v"].absmax, own["q"].absmax)
