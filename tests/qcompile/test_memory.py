"""release_freed_memory: what a compile frees goes back to the operating system (glibc)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from qcompile.core.memory import ConstantPool, release_freed_memory


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux's")
def test_freed_heap_blocks_go_back_to_the_system():
    """256 MB of 64 KB tensors (heap blocks, below glibc's mmap threshold), all freed but the
    last (which keeps the heap's top, so free() alone cannot shrink it): glibc keeps the pages
    until release_freed_memory asks."""
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]
    last = blocks[-1]
    del blocks
    before = resident_mb()
    assert release_freed_memory()
    after = resident_mb()
    assert before - after > 128, (before, after)
    assert last.sum() == 16 * 1024


# In a fresh process (its heap's state known): 256 constants of 1 MB, each followed by a small
# tensor that lives on (as a pass's other allocations do), so the heap cannot shrink from its top.
# glibc's mmap threshold is set where its sliding one ends (32 MB), so they are all in the heap.
DROPPED_CONSTANTS = """
import ctypes
import torch
from torch import fx
from qcompile.core import ir

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

ctypes.CDLL("libc.so.6").mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
for size in (256 * 1024, 32 * 1024):  # 1 MB constants (trimmed after), then 128 KB ones (not)
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    nodes, keep = [], []
    for i in range(256 if size > 32 * 1024 else 2048):
        gm.register_buffer(f"w{i}", torch.ones(size))
        nodes.append(gm.graph.get_attr(f"w{i}"))
        keep.append(torch.ones(16))
    before = resident_mb()
    for node in nodes:
        assert ir.drop_constant(gm, node)
    print(size, before - resident_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux's")
def test_a_dropped_large_constant_goes_back_to_the_system_at_once():
    """`ir.drop_constant` (a pass freeing the weight it replaced) trims after a constant of 1 MB or
    more: the 256 MB of them leave the process as they are dropped. Smaller ones are left to the
    next trim (a trim walks the whole heap): 256 MB of 128 KB constants stay resident."""
    out = subprocess.run([sys.executable, "-c", DROPPED_CONSTANTS], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    dropped = dict(zip(map(int, out[::2]), map(float, out[1::2])))
    assert dropped[256 * 1024] > 200 and dropped[32 * 1024] < 64, dropped


def test_a_pass_loop_gives_freed_memory_back_once_resident_memory_grew_by_the_step(monkeypatch):
    """`QPass.progress` calls `GrowthTrim` after each item: a trim when resident memory grew by
    TRIM_GROWTH_BYTES since the last one (or the start), counted from what is resident after it;
    none while it grows less, nor where resident memory cannot be read."""
    from qcompile.core import memory

    resident = iter([100, 130, 170, 175, 200, 238, 240, 300])  # MiB: the start, then one per item
    trims = []
    monkeypatch.setattr(memory, "TRIM_GROWTH_BYTES", 64)
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(resident))
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(True))
    trim = memory.GrowthTrim()  # floor 100
    for _ in range(2):
        trim()  # 130, 170: the second grew by 70, a trim, after it 175 resident
    assert len(trims) == 1 and trim.floor == 175
    for _ in range(2):
        trim()  # 200, 238: below 175 + 64
    assert len(trims) == 1
    trim()  # 240: 65 above, a trim
    assert len(trims) == 2 and trim.floor == 300
    monkeypatch.setattr(memory, "resident_bytes", lambda: None)
    memory.GrowthTrim()()  # nothing to measure: no trim, no error
    assert len(trims) == 2


def test_a_tensor_file_gives_back_each_spilled_tensor_bit_for_bit():
    """Tensors of any shape and dtype (0-dim, empty, non-contiguous) appended to one anonymous
    file: each handle reads its own bytes back, as a new tensor, at any time and in any order."""
    from qcompile.core.memory import SpilledTensor, TensorFile

    file = TensorFile()
    tensors = [torch.randn(5, 7), torch.tensor(3.5, dtype=torch.float64), torch.zeros(0, 4),
               torch.randn(6, 3).t(), torch.arange(11, dtype=torch.int8)]
    spilled = [file.spill(t) for t in tensors]
    assert all(isinstance(s, SpilledTensor) for s in spilled)
    for s, t in reversed(list(zip(spilled, tensors))):
        back = s.load()
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
        assert (back.data_ptr() != t.data_ptr() or not t.numel()) and s.dim() == t.dim()
    tensors[0].zero_()  # the file holds the bytes as they were when spilled
    assert not torch.equal(spilled[0].load(), tensors[0])
    assert copy.deepcopy(spilled[1]) is spilled[1]  # a deep copy of statistics shares the file


def test_a_constant_pool_gives_back_the_equal_tensor_it_holds_and_only_that():
    pool = ConstantPool()
    packed = torch.randint(0, 256, (64, 300), dtype=torch.uint8)
    assert pool.share(packed) is packed
    assert pool.share(packed.clone()) is packed  # equal bytes: the held tensor
    other = packed.clone()
    other[63, 299] ^= 1  # one bit off, outside the digested sample: compared whole
    assert pool.share(other) is other and pool.share(other.clone()) is other
    assert pool.share(packed.view(torch.int8).clone()) is not packed  # another dtype
    assert pool.share(packed.t().contiguous().t()) is not packed  # other strides
    step = torch.tensor(0.5)
    assert pool.share(step) is step and pool.share(torch.tensor(0.5)) is step
    nan = torch.tensor([float("nan")])
    assert pool.share(nan.clone()) is not pool.share(nan)  # NaN != NaN: never merged


def test_a_constant_pool_does_not_keep_its_tensors_alive():
    import weakref

    pool = ConstantPool()
    t = torch.ones(1000)
    ref = weakref.ref(t)
    pool.share(t)
    del t
    assert ref() is None
    fresh = torch.ones(1000)
    assert pool.share(fresh) is fresh


def test_a_constant_pool_survives_deep_copies_and_pickling():
    """transformers deep-copies a generation config holding the q4 backend, and with it every memo's pool."""
    import pickle

    pool = ConstantPool()
    t = torch.ones(10)
    pool.share(t)
    assert copy.deepcopy({"pool": pool})["pool"] is pool
    fresh = pickle.loads(pickle.dumps(pool))
    assert isinstance(fresh, ConstantPool) and fresh.share(torch.ones(10)) is not t
