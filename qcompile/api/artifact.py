"""Quantize once, save, load without calibrating: the user API of artifacts.

    qmodel = qcompile.quantize(model, calibration=batches, recipe="w4a4")   # calibrate + passes
    qmodel(**batches[0])                                                     # runs quantized
    qmodel.save("smollm2-w4a4")
    ...                                                                      # a new process:
    qmodel = qcompile.load(model, "smollm2-w4a4")                            # no calibration
    # or: torch.compile(model, backend="q4", options={"artifact": "smollm2-w4a4"})

A saved artifact (a directory; its format: `qcompile.frontend.saved_artifact`) holds what the
pipeline needs that only calibration or an expensive step can give: every linear's calibration
statistics, the results of the expensive steps (GPTQ, searched clipping ratios and migration
scales), the pipeline, and hashes of the parameters it was made from; and the constants the
pipeline computed (packed weights, steps, folded norm weights, rotations, ...).

Loading compiles the model as the backend always does (capture, normalize, freeze), attaches
the saved statistics instead of calibrating, and runs the same pipeline with the saved results
given back, so the expensive steps are looked up, not computed. The cheap float steps it runs
again may give other last bits on another machine (another thread count, torch version or CPU
kind): a result is found when its inputs agree within a tolerance, and every constant the
pipeline computed is checked against the saved one within the tolerance and replaced by the
saved bytes. So the quantized graph is the one that was saved, constant for constant, and the
model computes the same logits to the bit, wherever it is loaded. Constants are saved by name,
and the names come from the linears, not from one captured graph: a loaded model serves any
call Dynamo captures (another sequence length, a decode step, a graph break) as the original
did. A different model, another format version, a truncated or corrupted file, or a replay
beyond the tolerance (another pipeline) each raise `ArtifactError` saying which, before the
model runs: loading never recomputes an expensive step and never returns a different model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from qcompile.backends.q4 import CompiledGraph, Q4Backend
from qcompile.core.recipes import DEFAULT_RECIPE
from qcompile.frontend.saved_artifact import ArtifactError, parameter_hash, read_cached, save

__all__ = ["ArtifactError", "QuantizedModel", "quantize", "load"]


# --- the user-facing API -----------------------------------------------------------------------


class QuantizedModel:
    """A model compiled by the q4 backend: call it like the model; `save(dir)` writes the
    artifact. `graphs` are the backend's compiled graphs (`CompiledGraph`, for reports), as
    they are compiled; `seconds` how long quantizing (or loading) took, the first call included."""

    def __init__(self, model: torch.nn.Module, compiled: Callable, graphs: list[CompiledGraph], info: dict,
                 seconds: float):
        self.model = model
        self.compiled = compiled
        self.graphs = graphs
        self.info = info
        self.seconds = seconds

    @property
    def pipeline(self) -> str:
        return self.info["pipeline"]

    @property
    def recipe(self) -> str:
        return self.info["recipe"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's `generate()`, every step quantized (`qcompile.backends.generation`)."""
        return self.compiled.generate(*args, **kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write the artifact to `directory` (created if needed); returns the file written."""
        replays = [g.replay for g in self.graphs if g.replay is not None]
        if not replays:
            raise ValueError("nothing to save: this model was not quantized by qcompile.quantize "
                             "(a loaded model's artifact is the directory it came from)")
        kernel_cache = torch.compiler.save_cache_artifacts()
        return save(directory, replays, self.info, kernel_cache[0] if kernel_cache else None)


def _call(compiled: Callable, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return compiled(**batch)
    if isinstance(batch, (tuple, list)):
        return compiled(*batch)
    return compiled(batch)


def _compile(model: torch.nn.Module, options: dict) -> tuple[Callable, list[CompiledGraph]]:
    """`model` compiled by the q4 backend, and the list its graphs are added to as Dynamo compiles them."""
    graphs: list[CompiledGraph] = []
    backend = Q4Backend(options, on_compiled=lambda graph, _inputs: graphs.append(graph))
    return torch.compile(model, backend=backend), graphs


def _compile_and_run(model: torch.nn.Module, options: dict, example: Any) -> tuple[Callable, list, float]:
    start = time.perf_counter()
    compiled, graphs = _compile(model, options)
    with torch.no_grad():
        _call(compiled, example)
    return compiled, graphs, time.perf_counter() - start


def quantize(model: torch.nn.Module, calibration: list, recipe: str | None = None,
             example_inputs: Any = None, **options: Any) -> QuantizedModel:
    """Compile `model` with the q4 backend, calibrating on `calibration` (a list of batches:
    dicts of keyword arguments or tuples of positional ones), and run it once on
    `example_inputs` (default: the first batch) so that it is compiled. `options` are the
    backend's (`pipeline`, `disable`, `progress`, ...). The model is not modified.

    `calibration` goes to the backend as given, not copied: the backend's statistics and GPTQ
    results are cached by the calibration object (and the model's weights), so quantizing the
    same model on the same list again, or compiling it with that list, reuses them."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize() expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise ValueError("calibration must be a non-empty list of batches (dicts of keyword arguments "
                         "or tuples of positional arguments)")
    if "artifact" in options:
        raise TypeError("quantize() makes the artifact; qcompile.load() runs a saved one")
    recipe = recipe or DEFAULT_RECIPE
    compiled, graphs, seconds = _compile_and_run(
        model, {**options, "recipe": recipe, "calibration": calibration},
        calibration[0] if example_inputs is None else example_inputs)
    if not graphs:
        raise RuntimeError("quantize(): the q4 backend compiled no graph (was the model compiled already?)")
    info = {"recipe": recipe, "pipeline": graphs[0].pipeline, "model_hash": parameter_hash(model)}
    return QuantizedModel(model, compiled, graphs, info, seconds)


def load(model: torch.nn.Module, directory: str | Path, example_inputs: Any = None,
         **options: Any) -> QuantizedModel:
    """`model` quantized as saved in `directory`, ready to run, with no calibration.

    `model` must be the model that was quantized (its parameters are checked by hash). With
    `example_inputs` the first call happens here (and `seconds` counts it); otherwise at the
    model's first call. `options` are the backend's (printing, `lower`, `kernels`, ...).

    Loading reads tensors and JSON only, and compiles the quantized graphs here. The artifact's
    compiled kernels (`compiled.bin`: pickled code that runs when loaded) are used only with
    `trust_compiled=True`: say so only for an artifact you would run as code, e.g. one you saved
    yourself; it saves the compile time (`qcompile bench artifact` shows how much)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load() expects a torch.nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    saved = read_cached(directory)  # format, truncation and corruption errors come first
    expected, actual = saved.manifest.get("model_hash"), parameter_hash(model)
    if actual != expected:
        raise ArtifactError(
            f"artifact {saved.path} was saved for a different model: the parameter hash differs "
            f"(saved {str(expected)[:12]}..., this model {actual[:12]}...)"
        )
    info = {k: saved.manifest[k] for k in ("recipe", "pipeline", "model_hash")}
    options = {**options, "artifact": str(directory)}
    if example_inputs is None:  # compiled at the model's first call; `graphs` fills then
        compiled, graphs = _compile(model, options)
    else:
        compiled, graphs, _ = _compile_and_run(model, options, example_inputs)
    return QuantizedModel(model, compiled, graphs, info, time.perf_counter() - start)
