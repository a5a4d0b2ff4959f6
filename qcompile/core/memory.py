"""Giving freed memory back to the operating system, and keeping large statistics out of memory.

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
import hashlib
import os
import sys
import tempfile
import threading
import weakref

import torch

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


# How much resident memory may grow during a pass's loop before freed memory is given back
# (`GrowthTrim`): a trim walks the heap, and what it returns is faulted in again when reused.
TRIM_GROWTH_BYTES = 64 << 20


def resident_bytes() -> int | None:
    """The process's resident memory now, in bytes; None without /proc (not Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, no os.sysconf (Windows)
        return None


class GrowthTrim:
    """Called after each item of a pass's loop (a linear, a group): gives freed memory back when
    resident memory grew by TRIM_GROWTH_BYTES since the last trim or the start. Each item frees
    the temporaries it made (a migrated, rotated or rounded weight; GPTQ's blocks), but glibc keeps
    them, fragmented among the small objects the pass keeps, and new ones land elsewhere: on SmolLM2,
    migrate-scales left 276 MiB resident of which its live tensors were 5, and rotate-inputs 240."""

    def __init__(self) -> None:
        self.floor = resident_bytes()

    def __call__(self) -> None:
        now = resident_bytes()
        if now is None or self.floor is None or now - self.floor < TRIM_GROWTH_BYTES:
            return
        release_freed_memory()
        self.floor = resident_bytes()


class SpilledTensor:
    """A tensor kept in a `TensorFile` instead of memory: `load()` reads a copy back.

    Calibration's Gram matrices (x^T x per linear input: 195 MiB packed on SmolLM2-135M, 11 GB
    on a 7B Llama) are read once per linear by GPTQ, and again only when a recompile (a decode
    step's graph) misses GPTQ's memoized results. Held in memory, they sat under every pass and
    under the first calls of the quantized model; in a file, each is in memory only while GPTQ
    rounds its linears."""

    def __init__(self, file: TensorFile, offset: int, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.file, self.offset, self.shape, self.dtype, self.device = file, offset, shape, dtype, device

    def dim(self) -> int:
        return len(self.shape)

    def __deepcopy__(self, memo: dict) -> SpilledTensor:
        return self  # the bytes in the file never change: a copy would be the same tensor

    def load(self) -> torch.Tensor:
        return self.file.read(self.offset, self.shape, self.dtype).to(self.device)


class TensorFile:
    """An anonymous temporary file of tensors, appended to and read back (`SpilledTensor`).

    The file is unlinked at once (`tempfile.TemporaryFile`): it leaves nothing behind, even when
    the process is killed, and its space is freed when the last tensor spilled to it is
    garbage-collected (each holds the file). Its pages may sit in the page cache, which the system
    reclaims as it needs, not in the process's resident memory. It lives in Python's temporary
    directory (`TMPDIR`): where that is a tmpfs, the file is memory again, so point `TMPDIR` at a
    disk to spill large models' statistics."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="qcompile-")
        self._lock = threading.Lock()  # seek + read/write: one at a time (compiles on two threads)

    def spill(self, tensor: torch.Tensor) -> SpilledTensor:
        """Append a tensor's bytes; the handle that reads them back (onto the tensor's device)."""
        data = tensor.detach().cpu().contiguous()
        with self._lock:
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        return SpilledTensor(self, offset, data.shape, data.dtype, tensor.device)

    def read(self, offset: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with self._lock:
            self._file.seek(offset)
            read = self._file.readinto(buffer)
        if read != len(buffer):
            raise OSError(f"qcompile: a spilled tensor's file ended after {read} of {len(buffer)} bytes")
        return out


class ConstantPool:
    """One tensor for each set of equal constants in a model's compiled graphs.

    Generation compiles a model more than once (the prompt's graph, the decode step's, one per
    batch size under `dynamic=False`), and each compile runs the pipeline again: the results of
    its expensive steps come from the memo, but every compile packs its own copy of every
    quantized weight. The graphs then held one copy each (a tiny Llama's prefill and two decode
    graphs: 3 x the packed weights; a Llama-2-7B: 3.5 GB a graph). `share` gives back a tensor
    already held by an earlier graph when one is equal (same dtype, shape, strides, device and
    bytes: `torch.equal`, after a digest of a sample of the elements picks the candidates), so
    the new graph reads that one and its own copy is freed. Constants are never written in
    place once the passes are done, so sharing them changes no result. The pool holds weak
    references: the tensors live as long as some graph reads them.
    """

    SAMPLE = 4096  # elements of a tensor digested to pick the candidates that are compared whole

    def __init__(self) -> None:
        self._held: dict[tuple, list[weakref.ref]] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> ConstantPool:
        """The pool itself: a copy of what holds it (transformers deep-copies a generation config
        holding the backend, its calibration cache and memos) shares the model's constants."""
        return self

    def __reduce__(self) -> tuple:
        return ConstantPool, ()  # pickled: an empty pool (weak references and a lock do not travel)

    @classmethod
    def _key(cls, t: torch.Tensor) -> tuple:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // cls.SAMPLE)].contiguous().cpu()
        digest = hashlib.sha256(memoryview(sample.view(torch.uint8).numpy()) if sample.numel() else b"").hexdigest()
        return t.dtype, tuple(t.shape), t.stride(), str(t.device), digest

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """An equal tensor the pool already holds, else `t` (which it holds from now on)."""
        key = self._key(t)
        with self._lock:
            alive = [held for ref in self._held.get(key, []) if (held := ref()) is not None]
            found = next((held for held in alive if held is t or torch.equal(held, t)), None)
            if found is None:
                alive.append(t)
            self._held[key] = [weakref.ref(held) for held in alive]
            return t if found is None else found
