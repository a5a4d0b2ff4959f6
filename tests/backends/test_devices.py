"""The pipeline with the model 'on a GPU', emulated on CPU (tests/helpers/device_emulation.py):
no tensor qcompile makes on the host meets the model's device tensors, from calibration to the
compiled call. CI has no GPU, and each of these mixes raised there: calibration statistics, the
rotation factors, GPTQ's results and group multipliers, FP4 packing tables, split-channel
indices, a position buffer's check and a zero activation's step were all made on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from qcompile.backends.q4 import Q4Backend
from qcompile.tools.tiny_models import tiny_model
from tests.helpers.device_emulation import DeviceEmulation
from tests.helpers.models import tiny_llama

# qcompile lines that move to the CPU on purpose: a memo fingerprint sums its input there
# (`x.to("cpu")`, then a module constant, which the emulation takes for a device tensor)
ON_PURPOSE = ("qcompile/core/memo.py",)


def emulated_reports(model: torch.nn.Module, options: dict, inputs: dict) -> dict:
    emulation = DeviceEmulation()
    inner = Q4Backend({"progress": False, **options})

    def backend(gm, example_inputs):
        with emulation:
            run = inner(gm, example_inputs)

        def call(*args):
            with emulation:
                return run(*args)
        return call

    model.forward = torch.compile(model.forward, backend=backend, dynamic=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model(**inputs)
    return {key: text for key, text in emulation.reports.items() if not key[1].startswith(ON_PURPOSE)}


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recipe,dtype,lower", [
    ("w4a4", torch.float16, "eager"),  # migration, learned rotation, GPTQ, groups, sinks, the head
    pytest.param("fp4", torch.float16, "eager", marks=pytest.mark.slow),
    pytest.param("w4a4-split", torch.float16, "eager", marks=pytest.mark.slow),
    pytest.param("w4a4-qsm", torch.bfloat16, "eager", marks=pytest.mark.slow),
    pytest.param("w4a16", torch.float16, "inductor", marks=pytest.mark.slow),
])
def test_a_llama_on_a_gpu_mixes_no_devices(recipe, dtype, lower):
    torch._dynamo.reset()
    reports = emulated_reports(tiny_llama().to(dtype), {"recipe": recipe, "lower": lower,
                                                        "calibration": [{"input_ids": ids(1, 32)}]},
                               {"input_ids": ids(2, 16, seed=1), "use_cache": False})
    assert not reports, "\n".join(reports.values())


@pytest.mark.slow
@pytest.mark.parametrize("family,recipe", [("bert", "w4a4"), ("gemma", "w4a8"), ("mixtral", "w4a4"),
                                           ("gpt2", "w4a4-dynamic")])
def test_other_architectures_on_a_gpu_mix_no_devices(family, recipe):
    torch._dynamo.reset()
    inputs = {"input_ids": ids(2, 16, seed=1)} if family == "bert" else {"input_ids": ids(2, 16, seed=1),
                                                                        "use_cache": False}
    reports = emulated_reports(tiny_model(family), {"recipe": recipe, "lower": "eager",
                                                    "calibration": [{"input_ids": ids(1, 32)}]}, inputs)
    assert not reports, "\n".join(reports.values())


def test_the_emulation_sees_a_host_tensor_meet_the_models():
    """The check itself: a factory without a device in qcompile's code, then combined with an activation."""
    from qcompile.algorithms import gptq

    emulation = DeviceEmulation()
    with emulation:
        gptq.group_multipliers(torch.randn(4, 64), 32)  # (fixed: its buffers follow the weight's device)
    assert not emulation.reports
    from qcompile.kernels import rotation

    with emulation:
        factors = rotation.rotation_factors(64)  # made on the host (a pass moves them before use)
        torch.randn(3, 64) @ factors[0]
    assert [kind for kind, _ in emulation.reports] == ["mix"]
