"""The `q4` torch.compile backend: capture -> normalize -> freeze -> calibrate -> passes -> lower.

    torch.compile(model, backend="q4", options={"recipe": "w4a4-rtn", "calibration": batches})

Registered through the `torch_dynamo_backends` entry point (see pyproject.toml), so Dynamo finds
it without `import qcompile`.

Stages, each reported to the pass manager's instruments (printed / dumped as `000-capture.txt`,
`001-normalize.txt`, `002-freeze.txt`, then one file per pass):

capture    Dynamo's FX graph; parameters and buffers arrive as graph inputs.
normalize  make_fx in pre-dispatch mode over fake copies of the inputs: ATen ops, but
           `aten.linear`, `aten.layer_norm`, `aten.scaled_dot_product_attention` stay single
           nodes; `nn_module_stack` and `stack_trace` meta carry over. Tracing with fake inputs
           keeps Dynamo's symbolic shapes, so one graph serves every sequence length it guards.
freeze     parameter and buffer inputs become constants of the graph module (`get_attr`),
           detached from autograd; they alias the user's tensors, which are never written to.
           (Freezing after normalizing, not before, lets the tracer see parameters as ordinary
           fake inputs instead of mixing real constants into fake tracing.)
calibrate  observers on the linear inputs; batches from `options["calibration"]`, or the first
           call's inputs with a warning. Statistics are cached per weight parameter, so a
           recompile (a new shape) reuses them.
passes     the recipe's pipeline (or `options["pipeline"]` / `Q4_PIPELINE`) under the pass manager.
artifact   with `options["artifact"]` (a directory `qcompile.quantize(...).save` wrote), the
           statistics come from the artifact instead of calibration, and its pipeline runs with
           the saved results of its expensive steps (`qcompile/artifact.py`, `qcompile/memo.py`).
lower      `lower="inductor"` (default): the final graph goes through Inductor, which sees the
           q4 ops decomposed into ATen where that lets it fuse them (backends/lowering.py);
           `lower="eager"`: the final graph module runs as it is. `kernels="triton"`: the
           integer GEMMs run as Triton kernels on any device (interpreted on CPU).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx
from tabulate import tabulate
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from qcompile.frontend import calibrate
from qcompile.core import ir
from qcompile.api.artifact import ArtifactError, Replay, read_cached
from qcompile.core.memo import MEMO, Memo, MemoMiss
from qcompile.core.config import Q4Options, resolve_options
from qcompile.core.pass_manager import PassFailure, PassManager
from qcompile.core.pipeline import Pipeline, parse_pipeline
from qcompile.core.recipes import recipe_pipeline

__all__ = ["q4_backend", "Q4Artifact", "artifacts"]

# Calibration statistics by weight parameter (weakly: they die with the user's model), then by
# calibration data: {weight: {calibration key: (calibration object, ChannelStats)}}.
_STATS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ARTIFACTS: list[weakref.ref] = []

_STATE_SOURCE = re.compile(r"\._(?:parameters|buffers)\[")
_MODULE_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


def q4_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
               mode: str | None = None) -> Callable:
    """Dynamo backend entry point: compile one captured graph."""
    opts = resolve_options(options)
    frame_locals, frame_code = _compiled_frame()
    return _compile(gm, list(example_inputs), opts, frame_locals, frame_code, mode)


class Q4Artifact:
    """What a compiled graph is: the final graph module, its pipeline, its pass records."""

    def __init__(self, graph_module: fx.GraphModule, pipeline: str, records: list, run: Callable,
                 keep: list[int], graph_id: str, replay: Replay | None = None):
        self.graph_module = graph_module
        self.pipeline = pipeline
        self.records = records
        self.graph_id = graph_id
        # what qcompile.quantize(...).save() writes: calibration statistics, expensive results
        self.replay = replay
        self._run = run
        self._keep = keep

    def __call__(self, *args: Any) -> Any:
        with torch.no_grad():
            return self._run(*[args[i] for i in self._keep])

    def count_ops(self, op: Any) -> int:
        """How many nodes of the final graph call `op` (an OpOverload or OpOverloadPacket)."""
        return sum(
            1
            for n in self.graph_module.graph.nodes
            if n.op == "call_function" and (n.target is op or getattr(n.target, "overloadpacket", None) is op)
        )

    def outlier_report(self, worst: int | None = None) -> str:
        """Table of the linears' input outliers, worst first (needs analyze-outliers in the pipeline)."""
        from qcompile.passes.analyze_outliers import outlier_report

        return outlier_report(self.graph_module, worst)

    def migration_report(self) -> str:
        """One row per linear of the final graph: its module, whether it was quantized or left in
        float (and why), and what migrate-scales did with it (and why not)."""
        rows = []
        for n in self.graph_module.graph.nodes:
            if n.op != "call_function":
                continue
            fused = n.target is torch.ops.q4.linear_w4a4.default
            weight = n.args[1] if n.target is torch.ops.aten.linear.default else None
            fake_quant = isinstance(weight, fx.Node) and weight.target is torch.ops.q4.dequantize_weight_int4.default
            if not (fused or n.target is torch.ops.aten.linear.default):
                continue
            migration = n.meta.get(ir.MIGRATION, {"status": "-", "reason": "no migration pass ran"})
            form = "fused int4" if fused else "fake-quant" if fake_quant else "float"
            rows.append([ir.module_path(n) or n.name, form, n.meta.get(ir.FLOAT_REASON, ""),
                         migration["status"], migration["reason"]])
        return tabulate(rows, headers=["linear", "runs as", "why float", "migration", "detail"])

    def quantized_weight_bytes(self) -> int:
        """Bytes held by packed weights and their steps (constants read by q4 ops)."""
        seen: set[str] = set()
        total = 0
        for n in self.graph_module.graph.nodes:
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "q4":
                for arg in n.args:
                    t = ir.get_constant(self.graph_module, arg)
                    if t is not None and arg.target not in seen:
                        seen.add(arg.target)
                        total += t.numel() * t.element_size()
        return total


def artifacts() -> list[Q4Artifact]:
    """The q4 artifacts still alive in this process, oldest first (for inspection and tests)."""
    alive = [a for a in (r() for r in _ARTIFACTS) if a is not None]
    _ARTIFACTS[:] = [weakref.ref(a) for a in alive]
    return alive


# --- stages ------------------------------------------------------------------------------------


def _compiled_frame() -> tuple[dict, Any]:
    """Locals and code of the frame Dynamo is compiling: calibration runs the module found there."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return tx.f_locals, tx.f_code
    except Exception:  # noqa: BLE001 - outside Dynamo (a direct call) there is no frame
        return {}, None


def _source_name(node: fx.Node) -> str:
    """Dynamo's source of a graph input: `L['self']._modules['model']._parameters['weight']`."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    return (source() if callable(source) else source) or ""


def _is_state(node: fx.Node, value: Any) -> bool:
    """Is this graph input a parameter or buffer of the user's module?"""
    if isinstance(value, torch.nn.Parameter):
        return True
    return isinstance(value, torch.Tensor) and bool(_STATE_SOURCE.search(_source_name(node)))


def _fqn(source: str) -> str:
    """`L['self']._modules['model']._parameters['weight']` -> `model.weight`."""
    return ".".join(_MODULE_PATH.findall(source)) or source


def normalize(gm: fx.GraphModule, example_inputs: list[Any]) -> fx.GraphModule:
    """Trace Dynamo's graph to pre-dispatch ATen IR, on fake copies of the inputs."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    fake_mode = context.fake_mode if context is not None else None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fakify(value: Any, node: fx.Node) -> Any:
        if not isinstance(value, torch.Tensor):
            return node.meta.get("example_value", value)
        symbolic = context.tensor_to_context.get(value) if context is not None else None
        if symbolic is not None:
            return fake_mode.from_tensor(value, symbolic_context=symbolic,
                                         source=symbolic.tensor_source, trace=False)
        return fake_mode.from_tensor(value, static_shapes=True)

    fakes = [fakify(v, n) for v, n in zip(example_inputs, placeholders)]

    def run(*args: Any) -> Any:
        return fx.Interpreter(gm).run(*args)

    with torch.no_grad(), fake_mode, enable_python_dispatcher(), fx_traceback.preserve_node_meta():
        aten_gm = make_fx(run, record_module_stack=True, pre_dispatch=True)(*fakes)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm


def freeze(aten_gm: fx.GraphModule, state: dict[int, tuple[torch.Tensor, str]]) -> fx.GraphModule:
    """Replace the parameter/buffer inputs `state` {input index: (tensor, fqn)} with constants."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    graph = aten_gm.graph
    for index, (tensor, fqn) in state.items():
        node = placeholders[index]
        name = ir.add_constant(aten_gm, fqn, tensor.detach())
        with graph.inserting_before(node):
            const = graph.get_attr(name)
        const.meta.update(node.meta)
        const.meta[ir.FQN] = fqn
        node.replace_all_uses_with(const)
        graph.erase_node(node)
    aten_gm.recompile()
    return aten_gm


def _calibration_key(opts: Q4Options, gram: bool) -> Any:
    return ("first-call" if opts.calibration is None else id(opts.calibration), gram)


def _calibrate(aten_gm: fx.GraphModule, example_inputs: list[Any], state: dict[int, tuple],
               opts: Q4Options, frame_locals: dict, frame_code: Any, gram: bool) -> None:
    """Attach calibration stats (cached per weight parameter) to every observed linear; with
    Gram matrices if `gram`."""
    linears = calibrate.observed_linears(aten_gm)
    key = _calibration_key(opts, gram)
    # The cache is keyed by the user's parameter object, which the frozen constant aliases.
    params = {fqn: tensor for tensor, fqn in state.values()}

    def owner(n: fx.Node) -> torch.Tensor:
        return params.get(n.args[1].meta.get(ir.FQN), ir.get_constant(aten_gm, n.args[1]))

    # An entry holds the calibration object itself: while it does, no other object can reuse
    # its id, so a new calibration list never gets a dead one's statistics.
    def cached(n: fx.Node) -> calibrate.ChannelStats | None:
        entry = _STATS_CACHE.get(owner(n), {}).get(key)
        return entry[1] if entry is not None and entry[0] is opts.calibration else None

    if any(cached(n) is None for n in linears):
        user_inputs = [v for i, v in enumerate(example_inputs) if i not in state]
        stats = _observe(aten_gm, linears, params, user_inputs, opts, frame_locals, frame_code, gram)
        for n, s in stats.items():
            _STATS_CACHE.setdefault(owner(n), {})[key] = (opts.calibration, s)
    for n in linears:
        if (s := cached(n)) is not None:
            n.meta[ir.CALIB] = s


def _frame_module(frame_locals: dict) -> torch.nn.Module | None:
    """The module whose forward Dynamo is compiling, from the frame's locals: Hugging Face
    models compile their forward (`self`), or the decorator wrapping it (`wrapped_func(*args)`,
    `args[0]`); other modules compile torch's call wrapper, whose `fn` is the module."""
    candidates = [frame_locals.get("self"), frame_locals.get("fn")]
    args = frame_locals.get("args")
    if isinstance(args, tuple) and args:
        candidates.append(args[0])
    return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def _observe(aten_gm: fx.GraphModule, linears: list[fx.Node], params: dict[str, torch.Tensor],
             user_inputs: list[Any], opts: Q4Options, frame_locals: dict,
             frame_code: Any, gram: bool) -> dict[fx.Node, calibrate.ChannelStats]:
    """Run the calibration: the user's module on the batches, or the graph on the first call's
    inputs. `params` maps weight names to the user's parameters."""
    total = len(opts.calibration) if hasattr(opts.calibration, "__len__") else None
    progress = lambda it: tqdm(it, total=total, desc="q4 calibration", unit="batch",  # noqa: E731
                               disable=not opts.progress, leave=False)
    if opts.calibration is None:
        warnings.warn(
            "qcompile: no calibration data given (options={'calibration': batches}); "
            "calibrating static activation scales on the first call's inputs",
            stacklevel=2,
        )
        return calibrate.observe(aten_gm, [user_inputs], progress, gram)

    module = _frame_module(frame_locals)
    resumed = frame_code is not None and frame_code.co_name.startswith("torch_dynamo_resume_in")
    if module is None or resumed:
        raise calibrate.CalibrationError(
            "calibration batches need the model's forward: this graph "
            + ("starts after a graph break" if resumed else "was not captured from an nn.Module's forward")
            + " (compile the module itself, or leave out 'calibration' to calibrate on the first call)"
        )
    watched = {params[n.args[1].meta[ir.FQN]]: n.args[1].meta[ir.FQN] for n in linears
               if n.args[1].meta.get(ir.FQN) in params}
    try:
        by_name = calibrate.observe_model(module, opts.calibration, watched, progress, gram)
    except calibrate.CalibrationError as e:
        if "empty" in str(e) and iter(opts.calibration) is opts.calibration:
            raise calibrate.CalibrationError(
                f"{e} (the calibration object is an iterator that was already consumed: "
                "pass a list so recompiles can reuse it)"
            ) from None
        raise
    return {n: by_name[n.args[1].meta[ir.FQN]] for n in linears if n.args[1].meta.get(ir.FQN) in by_name}


def _lower(final_gm: fx.GraphModule, user_inputs: list[Any], opts: Q4Options, mode: str | None) -> Callable:
    from qcompile.backends.lowering import lower

    return lower(final_gm, user_inputs, opts.lower, opts.kernels, mode)


@dataclasses.dataclass
class Prepared:
    """A captured graph made ready for the passes: frozen ATen IR with calibration meta."""

    graph_module: fx.GraphModule
    keep: list[int]  # indices of the graph inputs that stay inputs (the rest were frozen)


def prepare(gm: fx.GraphModule, example_inputs: list[Any], opts: Q4Options, frame_locals: dict,
            frame_code: Any, on_stage: Callable[[str, fx.GraphModule], None] = lambda *_: None,
            needs: frozenset[str] = frozenset(), with_calibration: bool = True) -> Prepared:
    """capture -> normalize -> freeze -> calibrate (unless not `with_calibration`), reporting
    each stage to `on_stage`; `needs`: the optional statistics the pipeline's passes read
    (`QPass.calibration_needs`)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = {
        i: (v, _fqn(_source_name(n)))
        for i, (n, v) in enumerate(zip(placeholders, example_inputs))
        if _is_state(n, v)
    }
    on_stage("capture", gm)
    with torch.no_grad():
        aten_gm = normalize(gm, example_inputs)
        on_stage("normalize", aten_gm)
        aten_gm = freeze(aten_gm, state)
        on_stage("freeze", aten_gm)
        if with_calibration:
            _calibrate(aten_gm, example_inputs, state, opts, frame_locals, frame_code, "gram" in needs)
    return Prepared(aten_gm, [i for i in range(len(example_inputs)) if i not in state])


def build_pipeline(opts: Q4Options) -> Pipeline:
    """The pipeline `opts` asks for: the recipe's (or `opts.pipeline`), minus `opts.disable`, with
    the `rounding` and `unmatched` options applied to insert-quantizers."""
    pipeline = parse_pipeline(opts.pipeline if opts.pipeline is not None else recipe_pipeline(opts.recipe))
    if opts.disable:
        pipeline = pipeline.without(opts.disable)
    if not opts.rounding:
        pipeline = pipeline.with_option("insert-quantizers", "rounding", "false")
    if opts.unmatched != "quantize":
        pipeline = pipeline.with_option("insert-quantizers", "unmatched", opts.unmatched)
    return pipeline


def _compile(gm: fx.GraphModule, example_inputs: list[Any], opts: Q4Options, frame_locals: dict,
             frame_code: Any, mode: str | None) -> Q4Artifact:
    graph_id = str(gm.meta.get("dynamo_compile_id", "0")).replace("/", "-")
    if opts.dump_dir:
        opts = dataclasses.replace(opts, dump_dir=f"{opts.dump_dir}/graph-{graph_id}")
    saved = read_cached(opts.artifact) if opts.artifact is not None else None
    # an artifact's own pipeline, replayed on its statistics and results
    pipeline = parse_pipeline(saved.pipeline) if saved is not None else build_pipeline(opts)
    manager = PassManager.from_options(pipeline, opts, stream=sys.stderr)
    needs = pipeline.calibration_needs()
    prepared = prepare(gm, example_inputs, opts, frame_locals, frame_code, manager.on_stage, needs,
                       with_calibration=saved is None)
    frozen = prepared.graph_module
    if saved is not None:
        saved.check_parameters(frozen)
        saved.attach_stats(frozen)
        if opts.lower == "inductor":
            saved.warm_compile_caches()
    memo = frozen.meta[MEMO] = saved.memo() if saved is not None else Memo()
    replay = Replay.collect(frozen, memo) if saved is None else None  # before the passes edit it
    with torch.no_grad():
        try:
            result = manager.run(frozen)
        except PassFailure as e:
            if isinstance(e.__cause__, MemoMiss):
                raise ArtifactError(
                    f"artifact {saved.path} does not match this model or pipeline: pass {e.pass_text} "
                    f"found {e.__cause__}: the results are keyed by the exact bytes of what they were "
                    "computed from, so another model, pipeline or torch build (whose float arithmetic "
                    "differs in the last bits) misses them; quantize again here"
                ) from e
            raise
        final_gm = result.graph_module
        run = _lower(final_gm, [example_inputs[i] for i in prepared.keep], opts, mode)
    artifact = Q4Artifact(final_gm, str(pipeline), result.records, run, prepared.keep, graph_id, replay)
    _ARTIFACTS.append(weakref.ref(artifact))
    return artifact
