"""The tuned W4A4 GEMM over the tiled weight layout == the plain-torch reference of the stored
layout, bit for bit: over odd shapes, every candidate tile of every shape class (split-K
included), FP4 formats, group multipliers and per-row steps; the layout's round trip and what it
covers; the tuner's choice and its errors; bad input named before any launch.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
the kernel modules import triton), which is how CI runs this file.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402

from qcompile.kernels import formats, gpu_layout, int4, reference  # noqa: E402
from qcompile.kernels import triton_tiled_gemm as tiled  # noqa: E402
from qcompile.kernels.ops import KernelArgumentError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_SHAPES = [(1,), (3,), (37,), (2, 3)]
EVERY_CANDIDATE = tiled.candidates
NK = [(5, 64), (33, 128), (100, 192), (260, 320)]  # N not a multiple of any tile; K blocks not of BLOCK_K
# (260, 320) takes the interpreter's large tile (N * K >= 2**16)


@pytest.fixture(autouse=True)
def two_candidates_on_a_gpu(monkeypatch):
    """On a GPU the tuner compiles and times every candidate tile at each new key: these tests
    (hundreds of keys) tune two; `test_every_candidate_tile_of_a_shape_class_is_bit_exact` runs
    every one by name."""
    if torch.cuda.is_available():
        monkeypatch.setattr(tiled, "candidates", lambda m_class: EVERY_CANDIDATE(m_class)[:2])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def weight(n: int, k: int, fmt: str = formats.INT, seed: int = 0):
    """A packed 4-bit weight of random values in `fmt` and its steps."""
    codes, w_step = formats.quantize_weight_per_channel(torch.randn(n, k, generator=gen(seed)), fmt)
    return formats.pack(codes, fmt), w_step


def run_both(x, packed, w_step, a_step, bias, out_dtype, fmt=formats.INT, w_mult=None, config=None):
    """(tiled kernel, reference) outputs for the same product, the kernel given the re-laid weight."""
    k = x.shape[-1]
    got = tiled.linear_w4a4_tiled(*to_device(x, gpu_layout.to_tiled(packed, k), w_step, a_step, bias), out_dtype, fmt,
                                  w_mult=None if w_mult is None else w_mult.to(DEVICE), config=config)
    return got.cpu(), reference.linear_w4a4_ref(x, packed, w_step, a_step, bias, out_dtype, fmt, w_mult)


# --- the layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 64), (7, 128), (33, 576)])
def test_tiled_layout_round_trips_and_puts_k_and_k_plus_32_in_one_byte(n, k):
    packed, _ = weight(n, k)
    t = gpu_layout.to_tiled(packed, k)
    assert t.shape == (k // 2, n) and t.is_contiguous() and torch.equal(gpu_layout.from_tiled(t), packed)
    codes = int4.unpack_int4(packed, k).view(torch.uint8) & 15
    for c in range(k // 64):
        for i in (0, 31):
            assert torch.equal(t[32 * c + i], codes[:, 64 * c + i] | (codes[:, 64 * c + 32 + i] << 4))


def test_the_layout_covers_k_a_multiple_of_64():
    assert gpu_layout.covers(64) and gpu_layout.covers(4096) and gpu_layout.covers(11008)
    assert not any([gpu_layout.covers(0), gpu_layout.covers(96), gpu_layout.covers(301)])
    with pytest.raises(ValueError, match="multiple of 64"):
        gpu_layout.to_tiled(weight(4, 96)[0], 96)


# --- the kernel == the reference -----------------------------------------------------------------


@pytest.mark.parametrize("m_shape", M_SHAPES)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_tiled_w4a4_is_bit_exact_with_the_reference(m_shape, n, k, bias, out_dtype):
    g = gen(1)
    x = torch.randint(-128, 128, (*m_shape, k), dtype=torch.int8, generator=g)  # 8-bit codes: W4A8
    packed, w_step = weight(n, k)
    b = torch.randn(n, generator=g) if bias else None
    got, want = run_both(x, packed, w_step, torch.tensor(0.0173), b, out_dtype)
    assert got.shape == (*m_shape, n) and torch.equal(got, want)


@pytest.mark.parametrize("m", [3, 37, 300])  # classes 4 (decode), 64, 512 (prefill)
def test_every_candidate_tile_of_a_shape_class_is_bit_exact(m):
    """The tuner may pick any candidate on a GPU: each must compute the same bits (split-K too,
    with more splits than K blocks: the extra splits add zeros)."""
    n, k = 70, 320
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen(2))
    packed, w_step = weight(n, k)
    bias = torch.randn(n, generator=gen(3))
    configs = EVERY_CANDIDATE(tiled.shape_class(m))
    assert len(set(configs)) == len(configs) >= 6
    for config in configs:
        got, want = run_both(x, packed, w_step, torch.tensor(0.02), bias, torch.bfloat16, config=config)
        assert torch.equal(got, want), config


@pytest.mark.parametrize("fmt", [f for f in formats.FORMATS if f != formats.INT])
@pytest.mark.parametrize("split", [1, 3])
def test_tiled_fp4_is_bit_exact(fmt, split):
    x_values = formats.round_to_format(torch.randn(5, 192, generator=gen(4)) * 3, fmt).to(torch.int8)
    packed, w_step = weight(40, 192, fmt)
    got, want = run_both(x_values, packed, w_step, torch.tensor(0.1), None, torch.float16, fmt,
                         config=tiled.TileConfig(16, 32, 64, split))
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", [formats.INT, "e2m1"])
@pytest.mark.parametrize("groups", [1, 3, 12])  # K = 384: groups of 384, 128 and 32 k (the default
# recipe's w-group=32: a byte's two k, 32 apart, in two groups)
def test_tiled_with_group_multipliers_and_steps_per_row_is_bit_exact(fmt, groups):
    m, n, k = 6, 50, 384
    x = formats.round_to_format(torch.randn(m, k, generator=gen(5)) * 3, fmt).to(torch.int8)
    packed, w_step = weight(n, k, fmt)
    w_mult = torch.randint(1, formats.max_multiplier(fmt) + 1, (n, groups), dtype=torch.uint8, generator=gen(6))
    steps = torch.rand(m, 1, generator=gen(7)) + 0.01
    for split in (1, 2):
        got, want = run_both(x, packed, w_step, steps, torch.randn(n, generator=gen(8)), torch.float32, fmt, w_mult,
                             config=tiled.TileConfig(16, 32, 64, split))
        assert torch.equal(got, want)


def test_extreme_codes_accumulate_exactly_across_splits():
    """|acc| up to 128 * 8 * K: int32 partial sums added in int32, no float rounding between splits."""
    k = 4096
    x = torch.full((2, k), -128, dtype=torch.int8)
    packed = int4.pack_int4(torch.full((3, k), -8, dtype=torch.int8))
    w_step = torch.ones(3)
    got, want = run_both(x, packed, w_step, torch.tensor(1.0), None, torch.float32,
                         config=tiled.TileConfig(16, 32, 256, 8))
    assert torch.equal(got, want) and got[0, 0].item() == 128 * 8 * k


def test_an_empty_batch_launches_nothing():
    packed, w_step = weight(8, 64)
    out = tiled.linear_w4a4_tiled(*to_device(torch.zeros(0, 64, dtype=torch.int8), gpu_layout.to_tiled(packed, 64),
                                             w_step, torch.tensor(0.1)), None, torch.float32)
    assert out.shape == (0, 8)


# --- shape classes and the tuner -----------------------------------------------------------------


def test_shape_classes_round_m_up_to_a_power_of_two():
    assert [tiled.shape_class(m) for m in (1, 2, 3, 16, 17, 2048, 2049, 10**6)] == [1, 2, 4, 16, 32, 2048, 2048, 2048]
    assert all(c.split_k > 1 for c in EVERY_CANDIDATE(1)[1::4]) and all(c.block_m == 16 for c in EVERY_CANDIDATE(8))
    assert all(c.split_k == 1 and c.block_m >= 64 for c in EVERY_CANDIDATE(2048))
    assert all(c.block_k % gpu_layout.CHUNK == 0 for m in (1, 64, 2048) for c in EVERY_CANDIDATE(m))


@pytest.fixture
def compiled_mode(monkeypatch):
    """The tuner as on a GPU (times candidates) though the kernels are interpreted here."""
    monkeypatch.setattr(tiled, "INTERPRET", False)


def test_the_tuner_keeps_the_fastest_candidate_skipping_those_that_do_not_fit(compiled_mode):
    options = tiled.candidates(tiled.shape_class(4))
    fastest = options[-1]

    def time(fn):
        config = fn()
        if config == options[0]:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return 1.0 if config == fastest else 2.0

    tuner = tiled.Tuner(time)
    assert tuner.choose(("key",), 4, 4096, 4096, lambda config: config) == fastest
    assert tuner.choose(("key",), 4, 4096, 4096, lambda config: pytest.fail("tuned twice")) == fastest


def test_running_out_of_gpu_memory_while_tuning_names_the_shape(compiled_mode):
    def time(fn):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")

    with pytest.raises(tiled.TuningError, match=r"out of GPU memory while tuning .* M=1, N=11008, K=4096"):
        tiled.Tuner(time).choose(("key",), 1, 11008, 4096, lambda config: None)


def test_no_candidate_fitting_the_gpu_is_an_error(compiled_mode):
    def time(fn):
        raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    with pytest.raises(tiled.TuningError, match="no candidate tile fits this GPU for M=3000"):
        tiled.Tuner(time).choose(("key",), 3000, 64, 64, lambda config: None)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_named_before_launching():
    packed, w_step = weight(8, 128)
    t = gpu_layout.to_tiled(packed, 128)
    x = torch.zeros(2, 128, dtype=torch.int8)
    a_step = torch.tensor(0.1)
    with pytest.raises(KernelArgumentError, match="'w_tiled' must be a uint8 tensor \\[K/2, N\\]"):
        tiled.linear_w4a4_tiled(x, packed, w_step, a_step, None, torch.float32)  # the stored layout
    with pytest.raises(KernelArgumentError, match="'w_tiled'"):
        tiled.linear_w4a4_tiled(torch.zeros(2, 96, dtype=torch.int8), t[:48], w_step, a_step, None, torch.float32)
    with pytest.raises(KernelArgumentError, match="'w_step' must be a float32 tensor of shape \\(8,\\)"):
        tiled.linear_w4a4_tiled(x, t, w_step[:4], a_step, None, torch.float32)
    with pytest.raises(KernelArgumentError, match="'w_mult' must be G groups dividing K = 128 into groups of a multiple"):
        tiled.linear_w4a4_tiled(x, t, w_step, a_step, None, torch.float32, w_mult=torch.ones(8, 8, dtype=torch.uint8))
