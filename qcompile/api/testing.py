"""Helpers for tests of passes: the IR a pass sees, made from a small module in one call.

    gm = capture(MyModule(), torch.randn(2, 8))       # frozen, calibrated ATen IR
    result = MyPass(MyPass.Options())(gm)
    FileCheck().check("q4.linear_w4a4").check_not("aten.linear").run(gm.code)

`capture` runs the q4 backend stopped after its front half (Dynamo capture, normalize, freeze,
calibrate on the example inputs), so a pass test sees exactly the IR the pipeline would hand
that pass.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx

from qcompile.backends.q4 import Q4Backend
from qcompile.core.config import resolve_options
from qcompile.frontend.calibrate import CalibrationCache


def capture(module: torch.nn.Module, *args: Any, calibration: list | None = None, pipeline: str = "",
            **kwargs: Any) -> fx.GraphModule:
    """The frozen, calibrated ATen graph of `module(*args, **kwargs)` (one graph, no breaks).

    Calibration uses `calibration` batches if given, else the example inputs themselves, and
    gathers the optional statistics the passes of `pipeline` ask for (`QPass.calibration_needs`:
    `insert-quantizers{weights=gptq}` reads Gram matrices); the pipeline itself does not run.
    """
    options = resolve_options({"calibration": calibration, "progress": False, "pipeline": pipeline}, environ={})
    captured: list[fx.GraphModule] = []
    backend = Q4Backend(options, on_compiled=lambda graph, _inputs: captured.append(graph.graph_module),
                        calibration_cache=CalibrationCache(), stop_after="prepare")
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "calibrating on the first call" warning
        torch.compile(module, backend=backend, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    return captured[0]
