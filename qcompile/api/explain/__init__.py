"""Explain what the q4 backend does to a model, linear by linear, without compiling it.

    report = explain(model, {"input_ids": ids}, recipe="w4a4")      # same options as torch.compile
    print(report)                        # pass table, linear table, summary, pipeline
    report.linears[0].sqnr_db            # rows as dataclasses; report.to_dict() for JSON

    qcompile explain [--recipe w4a4] [--pipeline TEXT] [--tokens 256] [--json FILE]   (qcompile/tools/explain.py)

`explain` runs the q4 backend itself (`qcompile.backends.q4.Q4Backend`: capture, normalize,
freeze, calibrate, then the pipeline `options` ask for: recipe or `pipeline`, `disable`,
`rounding`, `unmatched`; the `Q4_*` environment too, as torch.compile(backend="q4") reads it),
with one more instrument in its pass manager (`measure.Recorder`), and stops it after the
passes: it does not lower the final graph and does not compile or run the quantized model; it
interprets the final graph once on the example inputs (an `fx.Interpreter`) to measure each
linear. Calibration batches default to the example inputs (one batch), as q4 calibrates on the
first call's inputs when given none; the statistics go to a calibration cache of explain's own
(an `artifact` option is ignored: explain calibrates).

How the capture stops: the backend, stopped after the passes, gives Dynamo the captured float
graph's own `forward`, so the example call then runs that captured float graph once (it is
cheap next to calibration). This is what lets a model with graph breaks be explained: Dynamo
only captures the graph after a break once the one before it has run. Each graph is reported on
its own (`report.graphs`); the linear rows say which graph they come from. Graphs after a break
calibrate on the example inputs as they reach them (q4 does the same without `calibration`),
and an explicit `calibration` option is refused there as q4 refuses it.

Per linear of the final graph (one row per `aten.linear` or `q4.linear_w4a4`, named by the
user's module path, `model.layers.0.self_attn.q_proj`):

runs as          `W4A4 fused` / `W4A8 fused` (q4.linear_w4a4), `W4A4 fake-quant` (quantized but
                 not fused: fuse-kernels disabled), `W4A16 weight-only`, `W4A4 not rounded`
                 (insert-quantizers{rounding=false}: the float function, measured as if
                 quantized), or `float` with the reason insert-quantizers gave (`q4_float_reason`);
                 ` g32` after it: the weight steps by groups of 32 k (insert-quantizers{w-group=32})
rotation         how rotate-inputs rotated the linear's input: `hadamard` (fixed factors),
                 `learned` (rotate-inputs{learn-steps=N}), `hadamard (learned was worse)` (learned
                 factors did not lower the held-out error, so the fixed ones stayed), or '-'
split            the input channels split-channels added (`+3`: the widest channels' copies), or '-'
first token      insert-quantizers{sinks=true}: `8-bit` when each sequence's first token (its
                 attention sink) has codes and a step of its own, `none: <why not>`, or '-'
outliers before  max over channels of absmax / median channel absmax of the linear's input on the
                 calibration data, before migration and rotation (analyze-outliers' `q4_outliers`;
                 '-' when that pass did not run)
outliers after   the same ratio measured on the example inputs for the activation that actually
                 enters the linear's activation quantizer in the final graph (after migration,
                 folding and rotation); for linears without one, its float input
SQNR dB          the linear's LOCAL quantization error on the example inputs:
                 10 * log10(sum(y_ref**2) / sum((y_ref - y_q)**2)), where y_q is the final
                 graph's quantized linear output and y_ref = F.linear(x, W, b) with x the float
                 activation that enters the linear's quantizer in the final graph (the same x the
                 quantized linear reads, so error from upstream layers does not accumulate into
                 it) and W, b the float weight and bias as they were just before the first
                 insert-quantizers pass ran (after migration, rotation and folding: the function
                 the quantizers approximate). inf when nothing was rounded; None ('-') for linears
                 left in float.

Final-graph linears are matched to those float weights through `q4_provenance` (insert-quantizers
and fuse-kernels name the nodes they replaced), falling back to the module path.

The package: `report` (the rows, their tables and JSON), `measure` (the recorder instrument and
the measuring interpreter), `driver` (`explain()`: runs the backend, builds the report).
"""

from qcompile.api.explain.driver import explain
from qcompile.api.explain.report import ExplainReport, GraphReport, LinearRow, PassRow

__all__ = ["explain", "ExplainReport", "GraphReport", "LinearRow", "PassRow"]
