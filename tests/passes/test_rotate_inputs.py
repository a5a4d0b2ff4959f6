"""rotate-inputs: before/after IR, exactness in real arithmetic on every family, and statistics
that follow the rotation."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.core import ir
from qcompile.kernels import rotation
from tests.helpers.models import inputs
from tests.helpers.passes import capture_family, first_output, run_pass


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "opt", "bert"])
def test_rotation_is_exact_in_real_arithmetic(family):
    x = inputs()
    gm = capture_family(family, x)
    before = first_output(gm, x).detach().clone()
    linears = sum(1 for n in gm.graph.nodes if n.target is ir.aten.linear.default and ir.CALIB in n.meta)
    result, stats = run_pass("rotate-inputs", gm)
    after = first_output(result.graph_module, x)
    # every calibrated linear but the language-model head (skipped by default)
    skipped = 0 if family == "bert" else 1
    assert stats["linears-rotated"] == linears - skipped
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel <= 1e-4, rel


def test_before_after_ir_shares_one_rotation_per_activation():
    gm = capture_family("llama", inputs())
    result, stats = run_pass("rotate-inputs", gm)
    code = result.graph_module.code
    # per layer: q/k/v share one rotation, o_proj one, gate/up one, down_proj one
    layers = 2
    assert stats["groups-rotated"] == 4 * layers
    assert code.count("q4.rotate.default") == 4 * layers
    FileCheck().check("q4.rotate.default").check("q_proj_weight_rotated").check("aten.linear").run(code)
    # factor constants are shared by every rotation of the same width, not copied per group
    factor_buffers = [name for name, _ in result.graph_module.named_buffers() if name.startswith("rotation_")]
    widths = {name.split("_")[1] for name in factor_buffers}
    assert len(factor_buffers) == sum(len(rotation.rotation_factors(int(w))) for w in widths)


def test_statistics_follow_the_rotation_and_clipping_is_searched_again():
    gm = capture_family("llama", inputs())
    q = next(n for n in gm.graph.nodes if ir.module_path(n).endswith("layers.0.self_attn.q_proj"))
    stats_before = q.meta[ir.CALIB]
    q.meta[ir.ACT_CLIP] = 0.5  # as a migration search would have left it
    run_pass("rotate-inputs", gm)
    stats_after = q.meta[ir.CALIB]
    factors = rotation.rotation_factors(stats_before.samples.shape[1])
    torch.testing.assert_close(stats_after.samples, rotation.rotate_reference(stats_before.samples, factors),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats_after.absmax, stats_after.samples.abs().amax(0))
    assert ir.ACT_CLIP not in q.meta


@pytest.mark.parametrize("n", [1, 2, 7, 12, 64, 96, 384, 576, 1536])
def test_rotation_op_matches_the_dense_reference_and_is_orthogonal(n):
    factors = rotation.rotation_factors(n)
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    expected = rotation.rotate_reference(x, factors)
    torch.testing.assert_close(torch.ops.q4.rotate(x, factors), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotation.rotate_decomposed(x, factors), expected, rtol=1e-5, atol=1e-5)
    dense = rotation.rotate_reference(torch.eye(n), factors)
    torch.testing.assert_close(dense @ dense.t(), torch.eye(n), rtol=0, atol=1e-5)
    # cheap: Hadamard factors of at most 64, as few as will do (far fewer than n multiply-adds an element)
    power = (n & -n).bit_length() - 1
    hadamard = [f.shape[0] for f in factors if f.shape[0] % 2 == 0]
    assert max(hadamard, default=1) <= 64 and len(hadamard) == -(-power // 6)


def test_splitting_the_hadamard_part_does_not_change_the_rotation():
    # 1536 = 3 * 512: factors [3, 16, 32]; kron(H16, H32) is the Sylvester matrix H512 itself
    odd, *hadamard = rotation.rotation_factors(1536)
    assert odd.shape[0] == 3 and [h.shape[0] for h in hadamard] == [16, 32]
    torch.testing.assert_close(torch.kron(*hadamard), rotation.sylvester(512), rtol=0, atol=1e-6)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 100
    rotated = torch.ops.q4.rotate(x, rotation.rotation_factors(96))
    ratio = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).median()).item()  # noqa: E731
    assert ratio(x) > 30 and ratio(rotated) < 3


def test_empty_input_rotates_to_empty():
    assert torch.ops.q4.rotate(torch.zeros(0, 12), rotation.rotation_factors(12)).shape == (0, 12)


def test_bad_width_names_the_argument():
    with pytest.raises(ValueError, match="argument 'x' must have last dimension 12"):
        torch.ops.q4.rotate(torch.randn(2, 10), rotation.rotation_factors(12))
