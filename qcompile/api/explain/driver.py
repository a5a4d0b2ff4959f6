"""explain's driver: run the q4 backend on the model, stopped after the passes, with a recorder
in each graph's pass manager, and make the report (see `qcompile.api.explain`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch._dynamo.exc import BackendCompilerFailed

from qcompile.api.explain.measure import Recorder, linear_rows
from qcompile.api.explain.report import ExplainReport, GraphReport, PassRow
from qcompile.backends.q4 import CompiledGraph, Q4Backend
from qcompile.core.config import resolve_options
from qcompile.core.instrument import Instrument
from qcompile.core.pipeline import Pipeline, pipeline_for
from qcompile.frontend.calibrate import CalibrationCache

__all__ = ["explain"]


class _GraphReports:
    """One GraphReport per graph the backend compiles: a fresh Recorder for each graph's pass
    manager (`instruments`), then the graph the passes left, measured (`add`)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.graphs: list[GraphReport] = []
        self._recorder: Recorder | None = None

    def instruments(self) -> list[Instrument]:
        self._recorder = Recorder()  # Dynamo compiles one graph at a time: this is the next graph's
        return [self._recorder]

    def add(self, graph: CompiledGraph, inputs: list[Any]) -> None:
        index = len(self.graphs)
        passes = [PassRow(index, i, r.name, str(self.pipeline[i]), r.options, r.seconds, r.modified, dict(r.stats))
                  for i, r in enumerate(graph.records)]
        rows = linear_rows(graph.graph_module, inputs, self._recorder, index)
        self.graphs.append(GraphReport(index, graph.graph_id, passes, rows))


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("explain(): a dict of example inputs must have str keys (the model's keyword arguments)")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"explain(): example_inputs must be a tuple of positional arguments, a dict of keyword "
                    f"arguments or a tensor, got {type(example_inputs).__name__}")


def explain(model: torch.nn.Module, example_inputs: Any, **options: Any) -> ExplainReport:
    """Run q4's front half and pipeline on `model` and report every pass and linear.

    `example_inputs`: a tuple of positional arguments, a dict of keyword arguments
    (`{"input_ids": ids}`) or one tensor. `options`: those of torch.compile(backend="q4",
    options=...) (`recipe`, `calibration`, `pipeline`, `disable`, `rounding`, ...; the `Q4_*`
    environment overrides them as it does there); `calibration` defaults to the example inputs.
    Lowering options are accepted and have no effect. The model is only read.

    Per-linear SQNR is local to the linear (see `qcompile.api.explain`): the final graph's
    quantized output against F.linear(x, W, b) on the same float input x, W and b the float
    weight and bias just before the first insert-quantizers pass, on the example inputs. Those
    float weights are held until the report is made (peak memory: about the model's linear
    weights twice).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"explain() needs a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    if model.training:
        warnings.warn("explain(): the model is in training mode (dropout makes calibration and the "
                      "measurements random); call model.eval() first", stacklevel=2)
    # explain calibrates: a saved artifact's statistics are not what it measures
    opts = dataclasses.replace(resolve_options(options), artifact=None)
    pipeline = pipeline_for(opts)  # an unknown recipe or a bad pipeline fails here, not in Dynamo
    default_calibration = opts.calibration is None
    if default_calibration:
        opts = dataclasses.replace(opts, calibration=[kwargs if kwargs else args])
    reports = _GraphReports(pipeline)
    # a graph after a break cannot calibrate on the model's forward: with calibration defaulted,
    # it calibrates on the example call's inputs as they reach it (q4 without `calibration` does too)
    backend = Q4Backend(opts, instruments=reports.instruments, on_compiled=reports.add,
                        calibration_cache=CalibrationCache(),  # explain leaves no statistics behind
                        stop_after="passes", first_call_after_break=default_calibration)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message="qcompile: no calibration data given")
            torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    except BackendCompilerFailed as e:
        raise e.inner_exception from None  # the backend's own error (a CalibrationError, say), unwrapped
    finally:
        torch._dynamo.reset()
    if not reports.graphs:
        raise RuntimeError(f"explain(): Dynamo captured no graph from {type(model).__name__} on these inputs "
                           "(nothing to quantize)")
    return ExplainReport(str(pipeline), reports.graphs)
