"""release_freed_memory: what a compile frees goes back to the operating system (glibc)."""

from __future__ import annotations

import sys

import pytest
import torch

from qcompile.backends.memory import release_freed_memory


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


# In a fresh process: a heap that already holds freed chunks serves requests from them at any
# threshold (only a request they cannot serve is mapped on its own).
RETURNED_AS_FREED = """
import torch
from qcompile.backends.memory import _M_MMAP_THRESHOLD, _THRESHOLD_AFTER, _mallopt, returned_as_freed

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

_mallopt()(_M_MMAP_THRESHOLD, _THRESHOLD_AFTER)
for inside in (True, False):  # inside first: the heap holds no freed chunks yet
    with returned_as_freed() if inside else open("/dev/null"):
        blocks, keep = [], []
        for _ in range(256):
            blocks.append(torch.ones(256 * 1024))
            keep.append(torch.ones(16))
        before = resident_mb()
        del blocks
        print(inside, before - resident_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_within_returned_as_freed_a_freed_block_leaves_at_once():
    """256 MB of 1 MB tensors, each followed by a small one that lives on (the weight copies a pass
    replaces one by one, among its other allocations), then freed: with glibc's threshold where its
    sliding one ends (32 MB) they stay resident; inside `returned_as_freed` (where the passes run)
    resident memory falls by them at `free`, before any trim."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", RETURNED_AS_FREED], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    dropped = dict(zip(out[::2], map(float, out[1::2])))
    assert dropped["False"] < 64 and dropped["True"] > 200, dropped
