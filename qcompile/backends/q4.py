"""The `q4` torch.compile backend: prepare -> run the pipeline -> lower.

    torch.compile(model, backend="q4", options={"recipe": "w4a4-rtn", "calibration": batches})

Registered through the `torch_dynamo_backends` entry point (see pyproject.toml), so Dynamo finds
it without `import qcompile`. Stages, each reported to the pass manager's instruments (printed /
dumped as `000-capture.txt`, `001-normalize.txt`, `002-freeze.txt`, then one file per pass):

prepare    capture, normalize, freeze, calibrate (`qcompile.frontend`): frozen ATen IR whose
           linears carry calibration statistics, cached per weight parameter so a recompile
           (a new shape) reuses them. Batches from `options["calibration"]`, or the first call's
           inputs with a warning.
passes     the recipe's pipeline (or `options["pipeline"]` / `Q4_PIPELINE`) under the pass manager.
artifact   with `options["artifact"]` (a directory `qcompile.quantize(...).save` wrote), the
           statistics come from the saved artifact instead of calibration, and its pipeline runs
           with the saved results of its expensive steps; the constants it computes are then
           checked against the saved ones and replaced by them, bit-exact on any machine
           (`qcompile.frontend.saved_artifact`, `qcompile.core.memo`).
lower      `lower="inductor"` (default): the final graph goes through Inductor, which sees the
           q4 ops decomposed into ATen where that lets it fuse them (qcompile/backends/lowering.py);
           `lower="eager"`: the final graph module runs as it is. `kernels="triton"`: the
           integer GEMMs run as Triton kernels on any device (interpreted on CPU).

`Q4Backend` is the backend as an object, for callers that need more than the entry point:
`qcompile.quantize` collects its compiled graphs (`on_compiled`), `qcompile.explain` adds an
instrument and stops after the passes, the pass-test helper stops after prepare.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import fx

import qcompile.passes  # noqa: F401  (declares the built-in passes the pipelines name)
from qcompile.backends import generation, range_check
from qcompile.backends.compiled_graph import CompiledGraph
from qcompile.backends.lowering import lower
from qcompile.core import ir
from qcompile.core.config import Q4Options, resolve_options
from qcompile.core.instrument import Instrument
from qcompile.core.memo import MEMO, MemoMiss
from qcompile.core.memory import ConstantPool, release_freed_memory
from qcompile.core.pass_manager import PassFailure, PassManager, PassManagerResult
from qcompile.core.pipeline import parse_pipeline, pipeline_for
from qcompile.frontend.calibrate import CalibrationCache
from qcompile.frontend.capture import compiled_frame, prompt_limit
from qcompile.frontend.prepare import prepare
from qcompile.frontend.saved_artifact import (
    ArtifactError,
    Replay,
    SavedArtifact,
    computed_constants,
    graph_constants,
    read_cached,
)

__all__ = ["q4_backend", "Q4Backend", "CompiledGraph", "compiled_graphs"]


class Q4Backend:
    """The q4 backend, configured: Dynamo calls it once per captured graph (`__call__`).

    options            torch.compile's `options` (a dict, resolved with the `Q4_*` environment at
                       each graph) or resolved `Q4Options`
    mode               torch.compile's mode, handed to the lowering (else the `mode` option)
    instruments        called once per graph: instruments added to that graph's pass manager
    on_compiled        called with each CompiledGraph and the graph's example inputs that stay
                       inputs (the parameters are frozen into it)
    calibration_cache  where calibration statistics are kept (default: one shared by all q4
                       compiles of the process, so a recompile reuses them)
    stop_after         "prepare" or "passes": stop there, hand `on_compiled` a graph that does
                       not run, and give Dynamo the captured graph's own forward (it runs in float)
    first_call_after_break  a graph starting after a graph break calibrates on its first call's
                       inputs, not on `options["calibration"]` (which needs the model's forward)
    """

    def __init__(self, options: Mapping[str, Any] | Q4Options | None = None, *, mode: str | None = None,
                 instruments: Callable[[], Sequence[Instrument]] = tuple,
                 on_compiled: Callable[[CompiledGraph, list[Any]], None] = lambda *_: None,
                 calibration_cache: CalibrationCache | None = None,
                 stop_after: Literal["prepare", "passes"] | None = None,
                 first_call_after_break: bool = False):
        if stop_after not in (None, "prepare", "passes"):
            raise ValueError(f"stop_after must be None, 'prepare' or 'passes', got {stop_after!r}")
        self.options, self.mode, self.instruments, self.on_compiled = options, mode, instruments, on_compiled
        self.calibration_cache = calibration_cache if calibration_cache is not None else _SHARED_CACHE
        self.stop_after, self.first_call_after_break = stop_after, first_call_after_break
        self.__name__ = "q4"  # how Dynamo names a backend in its errors

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], *,
                 parameter_names: dict[int, str] | None = None) -> Callable:
        """Compile `gm`; `parameter_names`: its parameter inputs, when compiling it again for
        another module instance's parameters (`CompiledGraph.bind_parameters`)."""
        opts = self.options if isinstance(self.options, Q4Options) else resolve_options(self.options)
        frame = compiled_frame()
        limit = prompt_limit(example_inputs, frame)
        if limit is not None:
            limit.check(example_inputs)  # before calibrating a graph that cannot run
        if frame.resumed and self.first_call_after_break:
            opts = dataclasses.replace(opts, calibration=None)
        example_inputs = list(example_inputs)
        graph_id = str(gm.meta.get("dynamo_compile_id", "0")).replace("/", "-")
        if opts.dump_dir:
            opts = dataclasses.replace(opts, dump_dir=f"{opts.dump_dir}/graph-{graph_id}")
        saved = read_cached(opts.artifact) if opts.artifact is not None else None
        # a saved artifact's own pipeline, replayed on its statistics and results
        pipeline = parse_pipeline(saved.pipeline) if saved is not None else pipeline_for(opts)
        base = PassManager.from_options(pipeline, opts, stream=sys.stderr)
        manager = PassManager(pipeline, [*base.instruments, *self.instruments()], stream=sys.stderr, progress=opts.progress)
        prepared = prepare(gm, example_inputs, opts, frame, None if saved is not None else self.calibration_cache,
                           manager.on_stage, pipeline.calibration_needs(), parameter_names)
        frozen, inputs = prepared.graph_module, [example_inputs[i] for i in prepared.keep]
        release_freed_memory()  # calibration's activations, freed: the passes' peak starts lower
        if self.stop_after == "prepare":
            self.on_compiled(CompiledGraph(frozen, str(pipeline), [], None, prepared.keep, graph_id), inputs)
            return gm.forward
        if saved is not None:
            saved.check_parameters(frozen)
            saved.attach_stats(frozen)
            if opts.lower == "inductor" and opts.trust_compiled:
                saved.load_kernel_cache()
        # the memo of expensive results is the model's: a recompile (decode after prefill) reuses it
        memo = frozen.meta[MEMO] = saved.memo() if saved is not None else self.calibration_cache.memo_for(
            prepared.parameters, opts.calibration)
        replay = Replay.collect(frozen, memo) if saved is None else None  # before the passes edit it
        result = _run_passes(manager, frozen, saved, replay)
        stop = self.stop_after == "passes"
        lowered, monitor = (result.graph_module, None) if stop or not opts.range_warning else \
            range_check.monitored(result.graph_module, graph_id)
        with torch.no_grad():
            run = None if stop else lower(lowered, inputs, opts.lower, opts.kernels, self.mode or opts.mode)
        if not stop:
            # the statistics the passes left on the linears (rotated and rescaled copies, Gram
            # matrices included) are not read again; `replay` and the calibration cache keep the
            # originals
            for node in result.graph_module.graph.nodes:
                node.meta.pop(ir.CALIB, None)
        graph = CompiledGraph(result.graph_module, str(pipeline), result.records, run, prepared.keep, graph_id, replay,
                              limit, monitor)
        if not stop:
            graph.bind_parameters({i: example_inputs[i] for i in prepared.names}, prepared.names,
                                  lambda args: self(gm, args, parameter_names=prepared.names))
        self.on_compiled(graph, inputs)
        release_freed_memory()  # calibration's and the passes' gigabytes, freed, back to the system
        return gm.forward if stop else graph


def _run_passes(manager: PassManager, frozen: fx.GraphModule, saved: SavedArtifact | None,
                replay: Replay | None) -> PassManagerResult:
    """Run the pipeline. Quantizing, `replay` records the constants it computed; from a saved
    artifact, a result it lacks is an ArtifactError, and the constants it computed are checked
    against the saved ones and replaced by them (the saved graph to the bit, on any machine)."""
    before = graph_constants(frozen)  # what the pipeline did not compute
    with torch.no_grad():
        try:
            result = manager.run(frozen)
        except PassFailure as e:
            if isinstance(e.__cause__, MemoMiss):
                raise ArtifactError(
                    f"artifact {saved.path} does not match this model or pipeline: in pass {e.pass_text}, "
                    f"{e.__cause__} (results are looked up by step, linear and arguments, their tensor inputs "
                    "compared within a tolerance that last-bit float differences pass): quantize again here"
                ) from e
            raise
    computed = computed_constants(result.graph_module, before)
    if saved is not None:
        saved.restore_constants(result.graph_module, computed)
    memo = frozen.meta.get(MEMO)
    if memo is not None:  # a recompile (decode after prefill) reads the earlier graphs' equal constants
        computed = _share_constants(result.graph_module, computed, memo.constants)
    if saved is None and replay is not None:
        replay.constants = computed
    return result


def _share_constants(gm: fx.GraphModule, constants: dict[str, torch.Tensor],
                     pool: ConstantPool) -> dict[str, torch.Tensor]:
    """Point `gm`'s constants (by name) at the equal tensors `pool` holds; the constants, shared."""
    shared = {}
    for name in constants:
        module, _, attr = name.rpartition(".")
        owner = gm.get_submodule(module) if module else gm
        t = getattr(owner, attr)
        shared[name] = pool.share(t)
        if shared[name] is not t:
            setattr(owner, attr, shared[name])
    return shared


# The entry point's state: calibration statistics shared by every q4 compile of the process, and
# the graphs it compiled (weakly), for inspection (`compiled_graphs()`).
_SHARED_CACHE = CalibrationCache()
_COMPILED: list[weakref.ref] = []


def q4_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
               mode: str | None = None) -> Callable:
    """Dynamo backend entry point (`backend="q4"`): compile one captured graph."""
    remember = lambda graph, _inputs: _COMPILED.append(weakref.ref(graph))  # noqa: E731
    return Q4Backend(options, mode=mode, on_compiled=remember)(gm, example_inputs)


def _is_q4_backend(fn: Any) -> bool:
    return fn is q4_backend or isinstance(fn, Q4Backend)


generation.install(_is_q4_backend)  # torch.compile(model, backend="q4").generate(...) quantizes


def compiled_graphs() -> list[CompiledGraph]:
    """The graphs `backend="q4"` compiled that are still alive in this process, oldest first (for
    inspection and tests; `qcompile.quantize` collects its own)."""
    alive = [g for g in (r() for r in _COMPILED) if g is not None]
    _COMPILED[:] = [weakref.ref(g) for g in alive]
    return alive
