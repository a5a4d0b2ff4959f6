"""Helpers for tests of passes: the IR a pass sees, made from a small module in one call.

    gm = capture(MyModule(), torch.randn(2, 8))       # frozen, calibrated ATen IR
    result = MyPass(MyPass.Options())(gm)
    FileCheck().check("q4.linear_w4a4").check_not("aten.linear").run(gm.code)

`capture` runs the q4 backend's own front half (Dynamo capture, normalize, freeze, calibrate on
the example inputs), so a pass test sees exactly the IR the pipeline would hand that pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qcompile.core.config import resolve_options


def capture(module: torch.nn.Module, *args: Any, calibration: list | None = None,
            needs: frozenset[str] = frozenset(), **kwargs: Any) -> fx.GraphModule:
    """The frozen, calibrated ATen graph of `module(*args, **kwargs)` (one graph, no breaks).

    Calibration uses `calibration` batches if given, else the example inputs themselves;
    `needs` asks for optional statistics (`{"gram"}`), as `QPass.calibration_needs` does.
    """
    import warnings

    from qcompile.backends import q4

    options = resolve_options({"calibration": calibration, "progress": False}, environ={})
    captured: list[fx.GraphModule] = []

    def grab(gm: fx.GraphModule, example_inputs: list[Any]):
        frame_locals, frame_code = q4._compiled_frame()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "calibrating on the first call" warning
            captured.append(q4.prepare(gm, list(example_inputs), options, frame_locals, frame_code,
                                      needs=needs).graph_module)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=grab, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    return captured[0]
