"""Giving freed memory back to the operating system.

Quantizing a model allocates and frees gigabytes in a few minutes: calibration activations,
Gram matrices, GPTQ's Hessians, rotated weight copies, Inductor's constants. glibc's allocator
keeps much of what is freed: large blocks served from the heap (its mmap threshold grows as
big blocks are freed), and the arenas of PyTorch's worker threads, are not returned until
`malloc_trim` asks. Measured on SmolLM2-135M (w4a8, eager lowering, generate 4 tokens, then
`torch._dynamo.reset()` and `gc.collect()`): 5.2 GB resident with 1.2 GB of live tensors;
`malloc_trim(0)` brings it to 1.8 GB. A test session that compiles SmolLM2 a dozen times grew
to 17 GB without it.

The passes replace weights one linear at a time (a migrated copy by a rotated one, a rotated one
by packed int4), and `ir.drop_constant` frees each replaced weight at once; freed in the middle of
the heap among the passes' other allocations, the copies stayed resident and the process grew by
about twice what it held. So `drop_constant` trims after freeing a large constant. SmolLM2 w4a4
(`qcompile.tools.bench.memory_row`, as `bench memory` runs it: 4096 tokens, eager; one fresh
process each, alone): peak 2715 MiB above the imports without it, 2301 MiB with it, quantizing in
150 s and 156 s. Fixing glibc's mmap threshold at 128 KiB while the passes ran (2cf732a) gave
2236 MiB, but then every temporary of the learned rotations and of GPTQ was mapped and unmapped
anew: `qcompile generate` spent 4 min 21 s in rotate-inputs (1 min 46 s without), 5 min 52 s in
the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# The smallest freed constant `ir.drop_constant` trims after: a trim walks the whole heap, and the
# small constants of tiny test models, freed by the thousand, would pay for it each time.
TRIM_AFTER_BYTES = 1 << 20


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the allocator's freed memory to the system (glibc); True if it could ask."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
