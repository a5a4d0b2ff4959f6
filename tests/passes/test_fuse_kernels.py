"""fuse-kernels: before/after IR, and the fused graph computes what the fake-quant graph does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.api.testing import capture
from tests.helpers.models import TwoHeads
from tests.helpers.passes import run_pass


def test_before_after_ir():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    fake_quant, _ = run_pass("insert-quantizers", gm)

    result, stats = run_pass("fuse-kernels", fake_quant.graph_module)

    assert result.modified and stats["linears-fused"] == 3
    (FileCheck()
        .check_count("q4.quantize_per_tensor.default", 1, exactly=True)
        .check_count("q4.linear_w4a4.default", 2, exactly=True)
        .check("aten.add")
        .check("q4.quantize_per_tensor.default")
        .check("q4.linear_w4a4.default")
        .check_not("aten.linear")
        .check_not("dequantize")
        .run(result.graph_module.code))


def test_fused_equals_fake_quant_graph():
    x = torch.randn(4, 5, 16)
    gm = capture(TwoHeads().eval(), x)
    fake_quant = run_pass("insert-quantizers", gm)[0].graph_module
    expected = copy.deepcopy(fake_quant)(x)[0]
    fused = run_pass("fuse-kernels", fake_quant)[0].graph_module
    torch.testing.assert_close(fused(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_eight_bit_activations_fuse_and_compute_the_fake_quant_graph():
    x = torch.randn(2, 3, 16)
    gm = capture(TwoHeads().eval(), x)
    fake_quant = run_pass("insert-quantizers", gm, a_bits=8)[0].graph_module
    expected = copy.deepcopy(fake_quant)(x)[0]
    result, stats = run_pass("fuse-kernels", fake_quant)
    assert result.modified and stats["linears-fused"] == 3 and stats["linears-not-fused"] == 0
    FileCheck().check_count("q4.quantize_per_tensor", 1).check_count("q4.linear_w4a4", 3).run(result.graph_module.code)
    torch.testing.assert_close(result.graph_module(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_no_change_on_a_float_graph():
    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    result, stats = run_pass("fuse-kernels", gm)
    assert not result.modified and stats["linears-fused"] == 0


def test_weight_only_linears_fuse_into_the_weight_only_kernel_and_compute_the_same():
    x = torch.randn(2, 3, 16)
    gm = capture(TwoHeads().eval(), x)
    weight_only = run_pass("insert-quantizers", gm, a_bits=16)[0].graph_module
    FileCheck().check_not("q4.quantize_per_tensor").check_count("q4.dequantize_weight_int4", 3).run(weight_only.code)
    expected = copy.deepcopy(weight_only)(x)[0]
    result, stats = run_pass("fuse-kernels", weight_only)
    assert result.modified and stats["linears-fused"] == 3 and stats["linears-not-fused"] == 0
    (FileCheck()
        .check_count("q4.linear_w4a16.default", 3, exactly=True)
        .check_not("aten.linear")
        .check_not("dequantize")
        .run(result.graph_module.code))
    torch.testing.assert_close(result.graph_module(x)[0], expected, rtol=1e-5, atol=1e-5)
    # the recognizer still reads them as weight-only linears; a second run changes nothing
    from qcompile.core import qlinear

    forms = {q.form for n in result.graph_module.graph.nodes if (q := qlinear.match(n)) is not None}
    assert forms == {qlinear.WEIGHT_ONLY}
    again, stats = run_pass("fuse-kernels", result.graph_module)
    assert not again.modified and stats["linears-fused"] == 0 and stats["linears-not-fused"] == 0


def test_its_invariant_holds_from_then_on():
    """fuse-kernels declares `fake-quant-linears-are-fused`; the verifier checks it on every graph
    fuse-kernels has run on, so a fake-quantized linear made later is reported."""
    from qcompile.core.verify import VerificationError, verify

    gm = capture(TwoHeads().eval(), torch.randn(2, 3, 16))
    first, _ = run_pass("insert-quantizers", gm, only="^out$")
    fused, _ = run_pass("fuse-kernels", first.graph_module)
    verify(fused.graph_module)
    # run directly, out of order (a pipeline string would be rejected): q and k stay fake-quantized
    late, _ = run_pass("insert-quantizers", fused.graph_module)
    with pytest.raises(VerificationError, match="invariant 'fake-quant-linears-are-fused' violated at %linear"):
        verify(late.graph_module)


@pytest.mark.parametrize("aten", [False, True])
def test_grouped_expert_gemms_fuse_into_the_grouped_kernel(aten):
    from tests.helpers.models import experts_case

    model, x, offs = experts_case(aten)
    gm = capture(model, x, offs)
    fake_quant = run_pass("insert-quantizers", gm)[0].graph_module
    expected = copy.deepcopy(fake_quant)(x, offs)[0]

    result, stats = run_pass("fuse-kernels", fake_quant)

    assert result.modified and stats["linears-fused"] == 2
    (FileCheck()
        .check("q4.quantize_per_tensor.default")
        .check("q4.grouped_linear_w4a4.default")
        .check("q4.quantize_per_tensor.default")
        .check("q4.grouped_linear_w4a4.default")
        .check_not("grouped_mm")
        .check_not("dequantize")
        .check_not("aten.transpose")
        .run(result.graph_module.code))
    got = result.graph_module(x, offs)[0]
    if aten:
        # bf16: the fake-quant graph rounds each dequantized code * step to bf16, so the gated
        # product between the GEMMs differs in its last bits and a down activation code may land
        # one step apart (here in one row of 9); the other rows agree to bf16's rounding
        row_error = (got.float() - expected.float()).abs().amax(dim=1)
        assert int((row_error > 2e-2).sum()) <= 1, row_error
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
