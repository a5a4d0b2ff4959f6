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
