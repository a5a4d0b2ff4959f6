"""Number formats of quantized codes: integers, and the 4-bit floats of LLM-FP4.

A code is an integer value v (held as int8); the number it stands for is v * step, with a float32
step per tensor (activations) or per output channel (weights). The format says which integers
v may be:

    int     two's complement, `bits` 2..8: every v in [-2**(bits-1), 2**(bits-1) - 1]
    e2m1    4-bit float, 2 exponent bits, 1 mantissa bit:  +-{0, 1, 2, 3, 4, 6, 8, 12}
    e3m0    4-bit float, 3 exponent bits, no mantissa:     +-{0, 1, 2, 4, 8, 16, 32, 64}
    e1m2    4-bit float, 1 exponent bit, 2 mantissa bits:  +-{0, 1, 2, 3, 4, 5, 6, 7}

A 4-bit float's values are those of the format (E2M1's 0, 0.5, ..., 6 with exponent bias 1)
times the power of two that makes its smallest subnormal 1 (E2M1 x 2, E3M0 x 4 with bias 3, E1M2
x 4 with bias 1), so every one is an integer that fits int8 and an FP4 x FP4 product is an exact
integer product: the integer GEMMs compute FP4 linears exactly (LLM-FP4, Liu et al. 2023, only
simulates them in float). The format's exponent bias, which LLM-FP4 searches as a real number,
is the step: a real multiple of a power of two is just another real number.

Rounding (`round_to_format`) goes to the nearest value, a tie to the even mantissa (IEEE round
half to even), saturating at the largest magnitude. It is computed as the kernels and Inductor
compute it, with elementwise ATen ops only: in the binade of |v| the values are `spacing` apart
(1 below the first binade boundary, doubling at each), so round(|v| / spacing) * spacing, exact in
float32 because spacing is a power of two. For e2m1 this is IEEE rounding of E2M1.

Storage: a weight is packed two codes a byte along K as a 4-bit nibble each (`pack`, `unpack`,
the layout of `int4.py`). An int nibble is two's complement; a float nibble is sign (bit 3) and
magnitude index (bits 0-2). `nibble_values(fmt)` is the 16-entry table from nibble to value that
the kernels use to decode (q4_cpu with a byte shuffle, Triton and Inductor with arithmetic).

Group multipliers (`w_mult`, uint8 [N, K / group]): a weight may give each group of `group`
consecutive k of a row its own step, an integer multiple of the row's step:

    w[n, k] = value(code[n, k]) * w_mult[n, k // group] * w_step[n]

The integer a kernel multiplies, value * w_mult, still fits int8 (`max_multiplier`: 15 for int4,
whose codes reach -8), so every integer GEMM stays exact and unchanged: the group's step lives in
the weight's integers, and the float epilogue is the per-channel one. llama.cpp's Q4_K does the
same with 6-bit sub-block scales under a float super-block scale. A group is GROUP_ALIGN k or a
multiple (a 16-byte lane of packed codes, what the kernels step by).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import int4

INT = "int"


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A 4-bit float: 1 sign bit, `exponent_bits` + `mantissa_bits` = 3, subnormals, no inf/NaN."""

    name: str
    exponent_bits: int
    mantissa_bits: int

    @property
    def magnitudes(self) -> tuple[int, ...]:
        """The 8 magnitudes as integers, by magnitude index: subnormals 0 .. 2**m - 1, then each
        binade e >= 1 holds (2**m + mantissa) * 2**(e - 1)."""
        m = self.mantissa_bits
        values = list(range(2 ** m))  # subnormals, spacing 1
        for e in range(1, 2 ** self.exponent_bits):
            values += [(2 ** m + mantissa) << (e - 1) for mantissa in range(2 ** m)]
        return tuple(values)

    @property
    def binade_starts(self) -> tuple[int, ...]:
        """Where the spacing between values doubles: 2**(m + 1), 2**(m + 2), ... (up to the largest binade)."""
        return tuple(2 ** (self.mantissa_bits + e) for e in range(1, 2 ** self.exponent_bits - 1))


FLOAT_FORMATS: dict[str, FloatFormat] = {
    "e2m1": FloatFormat("e2m1", 2, 1),
    "e3m0": FloatFormat("e3m0", 3, 0),
    "e1m2": FloatFormat("e1m2", 1, 2),
}
FORMATS = (INT, *FLOAT_FORMATS)


def check(fmt: str, bits: int = 4) -> None:
    """ValueError unless `fmt` is a format and `bits` fits it (floats are 4-bit)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown number format {fmt!r}; formats: {', '.join(FORMATS)}")
    if fmt != INT and bits != 4:
        raise ValueError(f"format {fmt!r} is a 4-bit float: bits must be 4, got {bits}")


def max_value(fmt: str, bits: int = 4) -> int:
    """The largest value: 2**(bits-1) - 1 for int, the largest magnitude for a float (12, 64, 7).
    A step of absmax / max_value maps the largest |x| onto it."""
    check(fmt, bits)
    return 2 ** (bits - 1) - 1 if fmt == INT else FLOAT_FORMATS[fmt].magnitudes[-1]


@functools.cache
def nibble_values(fmt: str) -> tuple[int, ...]:
    """value of each nibble 0..15: int4 two's complement, or a float's sign and magnitude index."""
    check(fmt)
    if fmt == INT:
        return tuple(range(8)) + tuple(range(-8, 0))
    magnitudes = FLOAT_FORMATS[fmt].magnitudes
    return magnitudes + tuple(-v for v in magnitudes)


def round_to_format(v: torch.Tensor, fmt: str, bits: int = 4) -> torch.Tensor:
    """The nearest value of the format to each float32 v (ties to even, saturating), as float32.

    Elementwise ATen ops only (the Inductor lowering of the quantize op runs this very function).
    """
    check(fmt, bits)
    if fmt == INT:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(v), -qmax - 1, qmax)
    f = FLOAT_FORMATS[fmt]
    a = v.abs()
    spacing = torch.ones_like(a)
    for start in f.binade_starts:
        spacing = torch.where(a >= start, spacing * 2, spacing)
    magnitude = torch.clamp(torch.round(a / spacing) * spacing, max=f.magnitudes[-1])
    return torch.where(v < 0, -magnitude, magnitude)


def _check_values(values: torch.Tensor, fmt: str) -> None:
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8 or values.dim() != 2:
        raise TypeError(f"formats.pack: values must be a 2-D int8 tensor [N, K], got "
                        f"{getattr(values, 'dtype', type(values).__name__)}")
    if fmt != INT and values.numel():
        allowed = torch.tensor(sorted(set(nibble_values(fmt))), dtype=torch.int8, device=values.device)
        if not bool(torch.isin(values, allowed).all()):
            bad = values[~torch.isin(values, allowed)][0].item()
            raise ValueError(f"formats.pack: {bad} is not a value of format {fmt!r} ({sorted(set(nibble_values(fmt)))})")


def pack(values: torch.Tensor, fmt: str) -> torch.Tensor:
    """int8 values [N, K] of the format -> uint8 [N, ceil(K/2)], two nibbles a byte along K (int4.py's layout)."""
    check(fmt)
    _check_values(values, fmt)
    if fmt == INT:
        return int4.pack_int4(values)
    index = torch.zeros(65, dtype=torch.int8, device=values.device)  # magnitude -> index
    for i, magnitude in enumerate(FLOAT_FORMATS[fmt].magnitudes):
        index[magnitude] = i
    nibbles = index[values.abs().long()] | torch.where(values < 0, 8, 0).to(torch.int8)
    return int4.pack_int4(torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8))


def unpack(packed: torch.Tensor, k: int, fmt: str) -> torch.Tensor:
    """uint8 [N, ceil(k/2)] -> int8 values [N, k]: the inverse of `pack`."""
    check(fmt)
    codes = int4.unpack_int4(packed, k)
    if fmt == INT:
        return codes
    table = torch.tensor(nibble_values(fmt), dtype=torch.int8, device=packed.device)
    return table[(codes & 15).long()]


GROUP_ALIGN = 32  # k a group holds is a multiple of this: 16 packed bytes, one SIMD lane of the kernels


def max_multiplier(fmt: str) -> int:
    """The largest group multiplier whose products with the format's values fit int8 (15 for int4:
    -8 * 15 = -120; 10 for E2M1's +-12; 18 for E1M2; 1 for E3M0's +-64)."""
    return 127 // max(abs(v) for v in nibble_values(fmt))


def group_size(k: int, w_mult: torch.Tensor) -> int:
    """k a group of `w_mult` [N, G] spans: K / G (the kernels' checks make sure it divides)."""
    return k // w_mult.shape[1]


def apply_multipliers(values: torch.Tensor, w_mult: torch.Tensor | None) -> torch.Tensor:
    """int8 values [N, k] times their group's multiplier (uint8 [N, G]), as int8 (the products fit):
    one broadcast multiply, a loop Inductor fuses with the unpacking."""
    if w_mult is None:
        return values
    n, groups = w_mult.shape
    k = values.shape[1]
    return (values.view(n, groups, k // groups) * w_mult.to(torch.int8)[:, :, None]).view(n, k)


def quantize_weight_per_channel(weight: torch.Tensor, fmt: str, bits: int = 4,
                                clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [N, K], float32 step [N]) of a float weight, rounded to nearest:
    step[n] = clip[n] * max_k |w[n, k]| / max_value (clip 1 by default); an all-zero row gets step 1."""
    if fmt == INT:
        if clip is None:
            return int4.quantize_weight_per_channel(weight, bits)
    check(fmt, bits)
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    step = absmax * (1.0 if clip is None else clip) / max_value(fmt, bits)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return round_to_format(w / step[:, None], fmt, bits).to(torch.int8), step
