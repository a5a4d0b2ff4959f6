"""Giving freed memory back to the operating system after a compile.

Quantizing a model allocates and frees gigabytes in a few minutes: calibration activations,
Gram matrices, GPTQ's Hessians, rotated weight copies, Inductor's constants. glibc's allocator
keeps much of what is freed: large blocks served from the heap (its mmap threshold grows as
big blocks are freed), and the arenas of PyTorch's worker threads, are not returned until
`malloc_trim` asks. Measured on SmolLM2-135M (w4a8, eager lowering, generate 4 tokens, then
`torch._dynamo.reset()` and `gc.collect()`): 5.2 GB resident with 1.2 GB of live tensors;
`malloc_trim(0)` brings it to 1.8 GB. A test session that compiles SmolLM2 a dozen times grew
to 17 GB without it.

While the passes run, `returned_as_freed` goes further: a block of 128 KiB or more that the
heap's free chunks cannot serve gets its own mapping, which `free` unmaps at once. The passes
replace weights one linear at a time (a migrated copy by a rotated one, a rotated one by packed
int4); with glibc's default the freed copies stay in the heap, fragmented, and the process grew by
about twice what it held. SmolLM2 w4a4-hadamard (`qcompile.quantize` on 4096 tokens, eager
lowering; peak resident memory above the imports during the passes, a scratch script reading
VmHWM): 2577 MiB without it, 2156 MiB with it. Calibration and inference keep the default:
mapping each activation anew costs page faults at every call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _glibc(name: str):
    """The C library's function `name` on Linux, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    return _glibc("malloc_trim")


# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# What glibc's sliding mmap threshold grows to at most on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), and
# the trim threshold it sets beside it (twice that): set after the passes, as the sliding ones
# would stand once the first large blocks are freed (a fixed threshold no longer slides).
_THRESHOLD_AFTER = 32 * 1024 * 1024


def _mallopt():
    return _glibc("mallopt") if _malloc_trim() is not None else None  # glibc's: musl has no malloc_trim


@contextlib.contextmanager
def returned_as_freed():
    """Within: a block of 128 KiB or more that the heap's free chunks cannot serve is mapped on its
    own and unmapped when freed (glibc; elsewhere nothing changes). On leaving, the thresholds are
    glibc's largest sliding ones and the freed memory goes back to the system. Process-wide, as
    glibc's allocator is: another thread allocating meanwhile gets the same treatment."""
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_AFTER)
            mallopt(_M_TRIM_THRESHOLD, 2 * _THRESHOLD_AFTER)
        release_freed_memory()


def release_freed_memory() -> bool:
    """Return the allocator's freed memory to the system (glibc); True if it could ask."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
