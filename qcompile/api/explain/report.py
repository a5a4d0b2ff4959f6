"""explain's report: one row per pass and per linear of every graph, as tables and as JSON."""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from tabulate import tabulate

__all__ = ["ExplainReport", "GraphReport", "LinearRow", "PassRow"]


@dataclasses.dataclass(frozen=True)
class PassRow:
    """One pass of one graph's pipeline run."""

    graph: int  # index of the graph in `ExplainReport.graphs`
    index: int  # position in the pipeline
    name: str
    spec: str  # the pass as written in the pipeline (`insert-quantizers{w-bits=4}`)
    options: str  # all its effective options (`w-bits=4,a-bits=4,skip=lm_head,...`)
    seconds: float
    changed: bool
    stats: dict[str, int]


@dataclasses.dataclass(frozen=True)
class LinearRow:
    """One linear of a final graph (see `qcompile.api.explain` for the columns)."""

    graph: int
    module: str  # the user's module path, or the node name when the graph has none
    runs_as: str
    w_bits: int | None  # None: float
    a_bits: int | None  # None: float; 16: float activations (weight-only)
    float_reason: str  # '' unless it runs in float
    migration: str  # what migrate-scales did: 'migrated', 'unmatched' or '-' (no migration pass)
    rotation: str  # what rotate-inputs did: 'hadamard', 'learned', 'hadamard (learned was worse)' or '-'
    split: int  # input channels split-channels added (0: none)
    first_token: str  # insert-quantizers{sinks=true}: '8-bit', 'none: <why>', or '-'
    outliers_before: float | None
    outliers_after: float | None
    sqnr_db: float | None
    node: str  # its node in the final graph

    @property
    def quantized(self) -> bool:
        """Whether its weight is rounded (fused, fake-quant or weight-only)."""
        return self.w_bits is not None and not self.runs_as.endswith("not rounded")


@dataclasses.dataclass
class GraphReport:
    """What happened to one Dynamo graph."""

    index: int
    graph_id: str  # Dynamo's compile id ("0-0")
    passes: list[PassRow]
    linears: list[LinearRow]


def _fmt_db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else f"{value:.2f}"


def _json_float(value: float | None) -> float | str | None:
    """JSON has no infinity: inf becomes the string 'inf'."""
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf" if value < 0 else "nan"


@dataclasses.dataclass
class ExplainReport:
    """The passes and the linears of every graph of one explained model.

    `pipeline` is the pipeline text that ran: `explain(model, inputs, pipeline=report.pipeline)`
    (or `Q4_PIPELINE='<it>'`) runs the same passes again.
    """

    pipeline: str
    graphs: list[GraphReport]

    @property
    def passes(self) -> list[PassRow]:
        return [row for g in self.graphs for row in g.passes]

    @property
    def linears(self) -> list[LinearRow]:
        return [row for g in self.graphs for row in g.linears]

    def linear(self, module: str) -> LinearRow:
        """The row of the linear at this module path (the first, if a module runs twice)."""
        for row in self.linears:
            if row.module == module:
                return row
        raise KeyError(f"no linear {module!r} in the report")

    def summary(self) -> str:
        rows = self.linears
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.runs_as] = counts.get(row.runs_as, 0) + 1
        quantized = sum(r.quantized for r in rows)
        floats = sum(r.w_bits is None for r in rows)
        parts = [f"{len(rows)} linears in {len(self.graphs)} graph{'s' if len(self.graphs) != 1 else ''}: "
                 f"{quantized} quantized, {floats} float"
                 + (f", {len(rows) - quantized - floats} not rounded" if len(rows) - quantized - floats else "")
                 + " (" + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"]
        measured = [r for r in rows if r.sqnr_db is not None]
        if measured:
            worst = min(measured, key=lambda r: r.sqnr_db)
            best = max(measured, key=lambda r: r.sqnr_db)
            median = statistics.median(r.sqnr_db for r in measured)
            parts.append(f"SQNR median {_fmt_db(median)} dB, min {_fmt_db(worst.sqnr_db)} dB ({worst.module}), "
                         f"max {_fmt_db(best.sqnr_db)} dB ({best.module})")
        return "; ".join(parts)

    def pass_table(self) -> str:
        many = len(self.graphs) > 1
        table = [([row.graph] if many else []) + [row.index, row.spec, row.seconds, "yes" if row.changed else "no",
                                                   ", ".join(f"{k}={v}" for k, v in row.stats.items() if v)]
                 for row in self.passes]
        headers = (["graph"] if many else []) + ["#", "pass", "seconds", "changed", "statistics"]
        return tabulate(table, headers=headers, floatfmt=".3f")

    def linear_table(self, rows: list[LinearRow] | None = None) -> str:
        many = len(self.graphs) > 1
        rows = self.linears if rows is None else rows
        table = [([r.graph] if many else []) + [
            r.module, r.runs_as, r.float_reason, r.migration, r.rotation, f"+{r.split}" if r.split else "-",
            r.first_token,
            "-" if r.outliers_before is None else f"{r.outliers_before:.1f}",
            "-" if r.outliers_after is None else f"{r.outliers_after:.1f}",
            _fmt_db(r.sqnr_db)] for r in rows]
        headers = (["graph"] if many else []) + ["linear", "runs as", "why float", "migration", "rotation", "split",
                                                  "first token", "outliers before", "outliers after", "SQNR dB"]
        return tabulate(table, headers=headers, disable_numparse=True)

    def __str__(self) -> str:
        return "\n\n".join([
            "passes:\n" + self.pass_table(),
            "linears (outliers: max / median channel absmax of the input; SQNR: the linear alone, "
            "on the example inputs):\n" + self.linear_table(),
            "summary: " + self.summary(),
            f"pipeline: Q4_PIPELINE='{self.pipeline}'",
        ])

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (inf SQNR as the string 'inf')."""
        def linear(row: LinearRow) -> dict:
            d = dataclasses.asdict(row)
            d.update({k: _json_float(d[k]) for k in ("outliers_before", "outliers_after", "sqnr_db")})
            d["quantized"] = row.quantized
            return d

        return {
            "pipeline": self.pipeline,
            "summary": self.summary(),
            "graphs": [{"index": g.index, "graph_id": g.graph_id,
                        "passes": [dataclasses.asdict(p) for p in g.passes],
                        "linears": [linear(r) for r in g.linears]} for g in self.graphs],
        }
