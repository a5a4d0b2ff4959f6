"""The number formats of codes (qcompile/kernels/formats.py): LLM-FP4's 4-bit floats as integer values,
their rounding (nearest, ties to even, saturating), packing, and bad input."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import formats, int4, reference

FLOATS = list(formats.FLOAT_FORMATS)


def test_float_formats_are_the_ieee_like_values_times_a_power_of_two():
    # E2M1 (bias 1) x 2, E3M0 (bias 3) x 4, E1M2 (bias 1) x 4
    assert formats.FLOAT_FORMATS["e2m1"].magnitudes == tuple(int(v * 2) for v in (0, .5, 1, 1.5, 2, 3, 4, 6))
    assert formats.FLOAT_FORMATS["e3m0"].magnitudes == tuple(int(v * 4) for v in (0, .25, .5, 1, 2, 4, 8, 16))
    assert formats.FLOAT_FORMATS["e1m2"].magnitudes == tuple(int(v * 4) for v in (0, .25, .5, .75, 1, 1.25, 1.5, 1.75))
    assert [formats.max_value(f) for f in FLOATS] == [12, 64, 7]
    assert formats.max_value("int", 4) == 7 and formats.max_value("int", 8) == 127


@pytest.mark.parametrize("fmt", FLOATS)
def test_rounding_goes_to_the_nearest_value_and_saturates(fmt):
    values = torch.tensor(sorted(set(formats.nibble_values(fmt))), dtype=torch.float32)
    assert torch.equal(formats.round_to_format(values, fmt), values)  # every value is its own rounding
    v = torch.randn(20000, generator=torch.Generator().manual_seed(1)) * formats.max_value(fmt) * 0.7
    distance = (v[:, None] - values[None]).abs()
    nearest = values[distance.argmin(1)]
    two = distance.sort(1).values[:, :2]
    clear = two[:, 1] - two[:, 0] > 1e-3  # not within rounding of a tie
    assert torch.equal(formats.round_to_format(v, fmt)[clear], nearest[clear])
    big = torch.tensor([1e6, -1e6, float(formats.max_value(fmt)) + 0.4])
    assert formats.round_to_format(big, fmt).tolist() == [formats.max_value(fmt), -formats.max_value(fmt),
                                                          formats.max_value(fmt)]


def test_ties_go_to_the_even_multiple_of_the_binade_spacing():
    # E2M1 is IEEE's round half to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 5 -> 4, 7 -> 8 (in units of 0.5)
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, -1.5, -10.0])
    assert formats.round_to_format(ties, "e2m1").tolist() == [0, 2, 2, 4, 4, 8, 8, -2, -8]
    # E3M0 (no mantissa bit): 3 is spacing 2 times 1.5 -> 2 (even) -> 4; 0.5 -> 0
    assert formats.round_to_format(torch.tensor([0.5, 1.5, 3.0, 6.0, 48.0]), "e3m0").tolist() == [0, 2, 4, 8, 64]
    assert formats.round_to_format(torch.tensor([0.5, 1.5, 2.5, 6.5]), "e1m2").tolist() == [0, 2, 2, 6]
    assert formats.round_to_format(torch.tensor([0.5, 1.5, 7.5, -8.5]), "int", 4).tolist() == [0, 2, 7, -8]


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (5, 64), (17, 257)])
def test_pack_unpack_round_trip_and_the_reference_unpacks_alike(fmt, n, k):
    g = torch.Generator().manual_seed(n * k)
    table = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)
    values = table[torch.randint(0, 16, (n, k), generator=g)]
    packed = formats.pack(values, fmt)
    assert packed.shape == (n, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(formats.unpack(packed, k, fmt), values)
    assert torch.equal(reference.unpack_ref(packed, k, fmt), values)


def test_int_format_is_int4s_layout_and_a_float_nibble_is_sign_and_index():
    values = torch.tensor([[-8, 7, 3]], dtype=torch.int8)
    assert torch.equal(formats.pack(values, "int"), int4.pack_int4(values))
    # e2m1: 6 (value 12) is index 7, -1 is sign | index 1 = 9
    assert formats.pack(torch.tensor([[12, -1]], dtype=torch.int8), "e2m1").tolist() == [[7 | 9 << 4]]


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_weight_quantization_per_row_uses_the_largest_value_and_is_safe_on_zero_rows(fmt):
    w = torch.tensor([[0.3, -2.4, 1.0], [0.0, 0.0, 0.0], [1e-3, 5e-4, -2e-3]])
    values, step = formats.quantize_weight_per_channel(w, fmt)
    top = formats.max_value(fmt)
    assert step.dtype == torch.float32 and torch.isfinite(step).all() and step[1] == 1
    assert values[0, 1] == -top and values[2, 2] == -top and (values[1] == 0).all()
    assert formats.pack(values, fmt).shape == (3, 2)
    clipped, clipped_step = formats.quantize_weight_per_channel(w, fmt, clip=torch.full((3,), 0.5))
    assert torch.allclose(clipped_step[[0, 2]], step[[0, 2]] / 2)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown number format 'e2m2'"):
        formats.check("e2m2")
    with pytest.raises(ValueError, match="bits must be 4"):
        formats.round_to_format(torch.zeros(2), "e2m1", 8)
    with pytest.raises(ValueError, match="5 is not a value of format 'e2m1'"):
        formats.pack(torch.tensor([[5]], dtype=torch.int8), "e2m1")
    with pytest.raises(TypeError, match="2-D int8"):
        formats.pack(torch.zeros(3, dtype=torch.int8), "e2m1")


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_group_multipliers_keep_every_product_in_int8(fmt):
    """max_multiplier: the largest multiplier whose products with the format's values fit int8;
    apply_multipliers (the kernels' broadcast) equals the reference's loop over the groups."""
    top = formats.max_multiplier(fmt)
    products = [v * m for v in formats.nibble_values(fmt) for m in range(1, top + 1)]
    assert min(products) >= -128 and max(products) <= 127
    assert max(abs(v) for v in formats.nibble_values(fmt)) * (top + 1) > 127  # and it is the largest
    g = torch.Generator().manual_seed(7)
    values = torch.tensor(formats.nibble_values(fmt), dtype=torch.int8)[torch.randint(0, 16, (5, 96), generator=g)]
    w_mult = torch.randint(1, top + 1, (5, 3), dtype=torch.uint8, generator=g)
    expected = reference.weight_values_ref(formats.pack(values, fmt), 96, fmt, w_mult)
    assert torch.equal(formats.apply_multipliers(values, w_mult), expected.to(torch.int8))
    assert formats.apply_multipliers(values, None) is values
