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


# --- learned rotations (learn-steps) -------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "opt", "bert"])
def test_learned_rotation_is_exact_in_real_arithmetic(family):
    x = inputs()
    gm = capture_family(family, x)
    before = first_output(gm, x).detach().clone()
    result, stats = run_pass("rotate-inputs", gm, learn_steps=10, learn_rate=0.05)
    assert stats["rotations-learned"] + stats["learned-rotations-worse"] == stats["groups-rotated"]
    after = first_output(result.graph_module, x)
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel <= 1e-4, rel


def learned_graph():
    gm = capture_family("llama", inputs())
    result, stats = run_pass("rotate-inputs", gm, learn_steps=20, learn_rate=0.05)
    return result.graph_module, stats


def test_before_after_ir_of_a_learned_rotation():
    gm, stats = learned_graph()
    assert stats["rotations-learned"] > 0
    code = gm.code
    # a learned group: its own factors (named after its first linear), no Hadamard shortcut flag
    FileCheck().check("q4.rotate.default(").check("q_proj_rotation_0").check("hadamard = False") \
        .check("q_proj_weight_rotated").check("aten.linear").run(code)
    rotations = [n for n in gm.graph.nodes if n.target is torch.ops.q4.rotate.default]
    learned = [n for n in rotations if n.kwargs.get("hadamard") is False]
    assert len(learned) == stats["rotations-learned"]
    for node in rotations:  # every linear says how its input was rotated
        for lin in node.users:
            assert lin.meta[ir.ROTATION] == ("learned" if node in learned else "hadamard (learned was worse)")
    for node in learned:  # orthogonal factors: the float function is unchanged
        for f in node.args[1]:
            factor = ir.get_constant(gm, f)
            torch.testing.assert_close(factor @ factor.t(), torch.eye(factor.shape[0]), rtol=0, atol=1e-5)


def test_a_learned_rotation_lowers_the_error_it_learns_on():
    from qcompile.algorithms import learn_rotation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)  # uneven channels
    x[:, 5] *= 20
    weights = [torch.randn(48, 64, generator=g), torch.randn(16, 64, generator=g)]
    result = learn_rotation.learn_rotation(x, weights, rotation.rotation_factors(64), steps=60, rate=0.02)
    assert result.learned and result.error_learned < 0.9 * result.error_start
    dense = rotation.rotate_reference(torch.eye(64), result.factors)
    torch.testing.assert_close(dense @ dense.t(), torch.eye(64), rtol=0, atol=1e-5)


def test_learning_reads_many_weight_rows_a_block_at_a_time(monkeypatch):
    """A group's weights are read in blocks of rows (an lm_head whole made ~400 MiB of float32
    temporaries): blocks that cut across weights hold exactly the stacked rows, drawn rows are
    exactly the stacked weights' rows, and learning in blocks of 40 rows does as well as in one."""
    from qcompile.algorithms import learn_rotation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=g) * torch.linspace(0.1, 3, 64)
    weights = [torch.randn(96, 64, generator=g), torch.randn(32, 64, generator=g).half()]
    stacked = torch.cat([w.float() for w in weights])
    whole = learn_rotation.learn_rotation(x, weights, rotation.rotation_factors(64), steps=10, rate=0.02)
    monkeypatch.setattr(learn_rotation, "BLOCK_ROWS", 40)
    blocks = list(learn_rotation._row_blocks(weights))
    assert [b.shape[0] for b in blocks] == [40, 40, 40, 8]
    assert torch.equal(torch.cat(blocks), stacked)
    rows = torch.randperm(128, generator=g)[:50]
    assert torch.equal(learn_rotation._gather_rows(weights, rows), stacked[rows])
    blocked = learn_rotation.learn_rotation(x, weights, rotation.rotation_factors(64), steps=10, rate=0.02)
    # the same measure to float32's rounding; Adam's steps amplify the last bits of near-zero
    # gradients, so the learned factors are as good, not the same bits
    assert blocked.error_start == pytest.approx(whole.error_start, rel=1e-5)
    assert blocked.learned and whole.learned
    assert blocked.error_learned == pytest.approx(whole.error_learned, rel=0.02)


def test_a_learned_rotation_that_is_not_better_keeps_the_fixed_factors():
    # a rate so small the factors do not move: no lower error, so the fixed factors stay
    gm = capture_family("llama", inputs())
    result, stats = run_pass("rotate-inputs", gm, learn_steps=3, learn_rate=1e-12)
    assert stats["rotations-learned"] == 0 and stats["learned-rotations-worse"] == stats["groups-rotated"] > 0
    rotations = [n for n in result.graph_module.graph.nodes if n.target is torch.ops.q4.rotate.default]
    assert all(not n.kwargs for n in rotations)  # the Hadamard form, shared factors
    assert {lin.meta[ir.ROTATION] for n in rotations for lin in n.users} == {"hadamard (learned was worse)"}


@pytest.mark.parametrize("bad", ["nan", "zeros"])
def test_learning_on_bad_samples_keeps_the_fixed_factors(bad):
    from qcompile.algorithms import learn_rotation

    x = torch.full((32, 12), float("nan")) if bad == "nan" else torch.zeros(32, 12)
    factors = rotation.rotation_factors(12)
    result = learn_rotation.learn_rotation(x, [torch.randn(8, 12)], factors, steps=5)
    assert not result.learned
    assert all(torch.equal(a, b) for a, b in zip(result.factors, factors))


@pytest.mark.parametrize("options, message", [({"learn_steps": -1}, "learn-steps must be >= 0"),
                                              ({"learn_rate": 0}, "learn-rate must be > 0")])
def test_bad_learning_options_are_refused(options, message):
    from qcompile.core.pass_api import PipelineError

    with pytest.raises(PipelineError, match=message):
        run_pass("rotate-inputs", capture_family("llama", inputs()), **options)


def test_rotation_op_with_any_factors_matches_the_dense_reference():
    g = torch.Generator().manual_seed(3)
    factors = [torch.linalg.qr(torch.randn(d, d, generator=g))[0] for d in (3, 16, 32)]  # not Sylvester
    x = torch.randn(5, 1536, generator=g)
    with pytest.raises(ValueError, match="Sylvester"):
        torch.ops.q4.rotate(x, factors)  # the Hadamard form checks its factors
    expected = rotation.rotate_reference(x, factors)
    torch.testing.assert_close(torch.ops.q4.rotate(x, factors, False), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotation.rotate_decomposed(x, factors, False), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hadamard", [True, False])
def test_a_tall_weight_is_rotated_in_blocks_of_rows_to_the_same_values(hadamard, dtype):
    """q4.rotate_weight (the pass's weight expression) rotates a weight WEIGHT_ROWS rows at a time
    (an lm_head's temporaries stay small): the values of rotating it whole in float32, over a row
    count no block size divides. Not always the same bits: a GEMM's kernel, and with it the
    rounding, may depend on the row count (here at width 96; at SmolLM2's 576 they were the same)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2 * rotation.WEIGHT_ROWS + 3, 96, generator=gen).to(dtype)
    factors = rotation.rotation_factors(96)
    if not hadamard:  # learned factors: any orthogonal ones
        factors = [torch.linalg.qr(torch.randn(f.shape, generator=gen))[0] for f in factors]
    rotated = torch.ops.q4.rotate_weight(weight, factors, hadamard)
    assert rotated.dtype == dtype
    torch.testing.assert_close(rotated, rotation.rotate(weight.float(), factors, hadamard).to(dtype))
