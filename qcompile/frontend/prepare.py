"""prepare: a graph Dynamo captured, made ready for the passes (capture -> normalize -> freeze
-> calibrate), each stage reported to the pass manager's instruments (`on_stage`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from qcompile.core.config import Q4Options
from qcompile.frontend.calibrate import CalibrationCache, calibrate_graph
from qcompile.frontend.capture import Frame, graph_state
from qcompile.frontend.normalize import freeze, normalize


@dataclasses.dataclass
class Prepared:
    """A captured graph made ready for the passes: frozen ATen IR with calibration meta."""

    graph_module: fx.GraphModule
    keep: list[int]  # indices of the graph inputs that stay inputs (the rest were frozen)
    parameters: list[torch.Tensor]  # the user's parameters and buffers frozen into it
    names: dict[int, str]  # their names, by graph input index


def prepare(gm: fx.GraphModule, example_inputs: list[Any], opts: Q4Options, frame: Frame,
            cache: CalibrationCache | None,
            on_stage: Callable[[str, fx.GraphModule], None] = lambda *_: None,
            needs: frozenset[str] = frozenset(), names: dict[int, str] | None = None) -> Prepared:
    """capture -> normalize -> freeze -> calibrate (from and into `cache`; None: no calibration,
    as when a saved artifact gives the statistics), reporting each stage to `on_stage`. `needs`:
    the optional statistics the pipeline's passes read (`QPass.calibration_needs`). `names`: the
    parameter inputs and their names, when the graph is prepared again after Dynamo compiled it
    (its inputs' sources are gone then)."""
    if names is None:
        state = graph_state(gm, example_inputs)
    else:
        state = {i: (example_inputs[i], name) for i, name in names.items()}
    on_stage("capture", gm)
    with torch.no_grad():
        aten_gm = normalize(gm, example_inputs)
        on_stage("normalize", aten_gm)
        aten_gm = freeze(aten_gm, state)
        on_stage("freeze", aten_gm)
        if cache is not None:
            calibrate_graph(aten_gm, example_inputs, state, opts, frame, cache, "gram" in needs)
    return Prepared(aten_gm, [i for i in range(len(example_inputs)) if i not in state],
                    [tensor for tensor, _ in state.values()], {i: name for i, (_, name) in state.items()})
