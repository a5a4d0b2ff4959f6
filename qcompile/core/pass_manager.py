"""The pass manager: runs a pipeline over a graph module, under instrumentation.

    pipeline = parse_pipeline("insert-quantizers{w-bits=4},fuse-kernels")
    manager = PassManager.from_options(pipeline, resolve_options({"timing": True}))
    manager.on_stage("capture", gm)            # stages before the pipeline: printed / dumped too
    result = manager.run(gm)                   # PassManagerResult(graph_module, records)

The manager owns everything cross-cutting (MLIR habit): a pass only transforms the graph and
reports whether it changed it; printing, dumping, verification, timing and statistics are
instruments (`qcompile.core.instrument`) the manager calls around each pass. Each `run` instantiates
the pipeline afresh, so statistics never leak between runs. Calling a pass (`QPass.__call__`)
records on the graph that it ran and, when it reports a change, drops the analyses cached for the
graph (`qcompile.core.analysis`), so the manager and a pass called directly behave alike.

When a pass fails (raises, returns something other than a PassResult, or leaves a graph the
verifier rejects) the manager raises `PassFailure`, whose message names the pass and its options,
the node the pass was at with its source line, the passes that ran before, the original error
(also kept as `__cause__`), and the pipeline that reproduces the run up to the failure.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from torch import fx

from qcompile.core import ir, weights
from qcompile.core.config import Q4Options
from qcompile.core.instrument import DumpIR, Instrument, Memory, PrintIR, Statistics, Timing, VerifyEach
from qcompile.core.pass_api import PassResult, QPass
from qcompile.core.pipeline import PassSpec, Pipeline, parse_pipeline

__all__ = ["PassManager", "PassManagerResult", "PassRecord", "PassFailure"]


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did: `options` is the text of all its effective options (`w-bits=4,a-bits=4`)."""

    name: str
    options: str
    seconds: float
    modified: bool
    stats: dict[str, int]


@dataclasses.dataclass
class PassManagerResult:
    graph_module: fx.GraphModule
    records: list[PassRecord]


class PassFailure(RuntimeError):
    """A pass of the pipeline failed; the original exception is `__cause__`.

    Attributes: `pass_text` (the pass as written in the pipeline), `node` (the node it was at, or
    None), `previous` (the passes that ran before, as written), `reproducer` (the pipeline text
    that reruns the run up to and including the failing pass).
    """

    def __init__(self, pass_text: str, node: fx.Node | None, previous: list[str], error: BaseException,
                 reproducer: str):
        lines = [f"pass {pass_text} failed"]
        if node is not None:
            lines.append(f"  at node: {ir.describe(node)}")
        lines.append(f"  after passes: {', '.join(previous)}" if previous else "  (it was the first pass)")
        detail = f"{type(error).__name__}: {error}".replace("\n", "\n    ")
        lines.append(f"  error: {detail}")
        lines.append(f"  reproduce with: Q4_PIPELINE={_shell_quote(reproducer)}")
        super().__init__("\n".join(lines))
        self.pass_text, self.node, self.previous, self.reproducer = pass_text, node, previous, reproducer


def _shell_quote(text: str) -> str:
    """Always single-quoted (braces are shell syntax), with any ' inside escaped."""
    return "'" + text.replace("'", "'\\''") + "'"


class PassManager:
    """Runs `pipeline` over a graph module, calling `instruments` around each pass."""

    def __init__(self, pipeline: Pipeline | str, instruments: Iterable[Instrument] = (),
                 stream: TextIO | None = None, progress: bool = False):
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        self.progress = progress  # passes show progress bars on long loops (`QPass.progress`)
        self.stream = stream if stream is not None else sys.stderr
        self.instruments = list(instruments)
        for instrument in self.instruments:
            if getattr(instrument, "stream", None) is None:
                instrument.stream = self.stream

    @classmethod
    def from_options(cls, pipeline: Pipeline | str, options: Q4Options, stream: TextIO | None = None) -> PassManager:
        """A manager with the instruments `options` asks for.

        `options.disable` is NOT applied here: the caller builds the pipeline, including
        `Pipeline.without(options.disable)`.
        """
        o = options
        instruments: list[Instrument] = []
        if o.print_before or o.print_after or o.print_after_all or o.print_after_change or o.print_after_failure:
            instruments.append(PrintIR(o.print_before, o.print_after, o.print_after_all,
                                       o.print_after_change, o.print_after_failure,
                                       provenance=o.print_provenance))
        if o.dump_dir:
            instruments.append(DumpIR(o.dump_dir, provenance=o.print_provenance))
        # After printing and dumping: the graph that fails verification is printed / dumped first.
        if o.verify_each:
            instruments.append(VerifyEach())
        if o.timing:
            instruments.append(Timing())
        if o.stats:
            instruments.append(Statistics())
        if o.memory:
            instruments.append(Memory())
        return cls(pipeline, instruments, stream, progress=o.progress)

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        """Report a stage outside the pipeline (e.g. "capture", "normalize") to the instruments."""
        for instrument in self.instruments:
            instrument.on_stage(name, gm)

    def run(self, gm: fx.GraphModule) -> PassManagerResult:
        """Run every pass of the pipeline in order; raise `PassFailure` at the first failure."""
        records: list[PassRecord] = []
        try:
            for index, qpass in enumerate(self.pipeline.instantiate()):
                gm, record = self._run_pass(index, qpass, gm)
                records.append(record)
            # the weights of linears left in float, as constants: what lowering and artifacts take
            weights.fold(gm)
        finally:
            for instrument in self.instruments:
                instrument.finish()
        return PassManagerResult(gm, records)

    def _run_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassRecord]:
        for instrument in self.instruments:
            instrument.before_pass(index, qpass, gm)
        qpass.show_progress = self.progress
        try:
            start = time.perf_counter()
            result: Any = qpass(gm)  # PassBase.__call__: requires -> call -> ensures
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {qpass.name!r} returned {result!r}, not a PassResult: "
                                "call() must end with `return PassResult(graph_module, modified)`")
            gm = result.graph_module
            for instrument in self.instruments:
                instrument.after_pass(index, qpass, gm, result, seconds)
        except Exception as exc:
            for instrument in self.instruments:
                instrument.on_failure(index, qpass, gm, exc)
            # A verifier error knows its node; otherwise the node the pass was iterating over.
            node = getattr(exc, "node", None)
            node = node if isinstance(node, fx.Node) else qpass.current_node
            raise PassFailure(
                str(self.pipeline[index]), node, [str(spec) for spec in self.pipeline[:index]], exc,
                str(Pipeline(self.pipeline[: index + 1])),
            ) from exc
        record = PassRecord(qpass.name, PassSpec.of(qpass).options_text(), seconds, bool(result.modified),
                            dict(qpass.stats))
        return gm, record
