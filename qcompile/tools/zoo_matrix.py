"""The architecture matrix: every recipe on a tiny model of twelve architectures, in fp32, fp16
and bf16 (`qcompile.tools.tiny_models`), and what q4 made of each.

    qcompile zoo-matrix [--families llama,gpt2] [--dtypes float32,bfloat16] [--recipes w4a4,fp4] [--lower eager]

Per (family, dtype, recipe), three compiles of the same model on the same two calibration batches:

exact      rounding off (`rounding=False`): the migrated, rotated, folded float graph, compared with
           the model. In fp32 the relative error must be <= 1e-4; in fp16/bf16 the model itself
           rounds every op, so the graph may differ from it by the dtype's own error: the bound is
           3x the model's distance from its fp32 copy (relative error against that copy).
fused      the recipe as it is, on the fused kernels;
fake       the same pipeline without fuse-kernels: fake-quant ops in float, the reference the
           fused kernels must match. In fp32 they agree to rounding (SQNR >= 80 dB; measured
           ~135). In fp16/bf16 the fake-quant ops round x / step in the half dtype where the
           kernels quantize in fp32, so codes near a rounding boundary differ (bf16 w4a4-rtn on
           Llama: fused vs fake 17 dB, fused vs model 12.0 dB, fake vs model 11.6 dB: the
           kernels are the closer). Their difference must stay within the quantization noise
           (SQNR of fused vs fake >= fused vs model; OPT bf16 w4a4-dynamic, the closest: 14.4
           against 12.2), and the kernels must be as accurate as the reference (SQNR against
           the model at most 1 dB below the fake-quant graph's).

Reported: both errors, the quantized output's SQNR against the model (random weights: no
outliers, so it measures only that quantization ran, not a recipe's quality), how many linears
(a mixture of experts' grouped expert GEMMs counted with them) run quantized or in float and
why, and the seconds. Nothing is downloaded; a cell that raises
reports the exception (and fails the check) instead of stopping the matrix.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time
import warnings

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from qcompile.algorithms.metrics import max_relative_error, sqnr_db
from qcompile.backends.q4 import CompiledGraph, Q4Backend
from qcompile.core import ir, qlinear
from qcompile.core.recipes import RECIPES
from qcompile.tools.tiny_models import FAMILIES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXACT_FP32 = 1e-4
EXACT_HALF_FACTOR = 3.0  # times the half model's own error against its fp32 copy
FUSED_VS_FAKE_FP32_DB = 80.0
FUSED_VS_FAKE_HALF_MARGIN_DB = 0.0  # over the quantization noise (SQNR of fused vs the model)
FUSED_LOSS_HALF_DB = 1.0  # how much less accurate than the fake-quant graph the kernels may be
# The default recipe learns each layer's rotation by 120 Adam steps; 8 steps (at a rate that moves
# in so few) exercise the same passes and kernels at a tenth of the time on 36 models.
QUICK_LEARNING = ("learn-steps=120,learn-rate=0.02", "learn-steps=8,learn-rate=0.05")


@dataclasses.dataclass
class Cell:
    """One (family, dtype, recipe): what the three compiles measured."""

    family: str
    dtype: str
    recipe: str
    exact_error: float | None = None
    exact_bound: float | None = None
    fused_vs_fake_db: float | None = None  # SQNR of the fused output against the fake-quant one
    fused_bound_db: float | None = None
    sqnr_db: float | None = None  # of the fused output against the model
    fake_sqnr_db: float | None = None  # of the fake-quant output against the model
    quantized: int = 0
    in_float: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # why float: count
    seconds: float = 0.0
    error: str = ""  # the exception a compile raised

    def problems(self) -> list[str]:
        """The checks this cell fails (empty: it passes)."""
        if self.error:
            return [self.error]
        found = []
        if self.exact_error is None or not self.exact_error <= self.exact_bound:
            found.append(f"rounding off: error {self.exact_error:.2e} > {self.exact_bound:.2e}")
        if self.fused_vs_fake_db is None or not self.fused_vs_fake_db >= self.fused_bound_db:
            found.append(f"fused vs fake-quant: SQNR {self.fused_vs_fake_db:.1f} dB < {self.fused_bound_db:.1f} dB")
        if self.dtype != "float32" and self.sqnr_db is not None and \
                not self.sqnr_db >= self.fake_sqnr_db - FUSED_LOSS_HALF_DB:
            found.append(f"fused SQNR {self.sqnr_db:.1f} dB < fake-quant's {self.fake_sqnr_db:.1f} dB - {FUSED_LOSS_HALF_DB}")
        if self.quantized == 0:
            found.append("no linear was quantized")
        return found


def pipeline_of(recipe: str, quick: bool) -> str:
    pipeline = RECIPES[recipe]
    return pipeline.replace(*QUICK_LEARNING) if quick else pipeline


def _compile_and_run(model, pipeline: str, calibration: list, run: dict, lower: str,
                     **options) -> tuple[torch.Tensor, CompiledGraph]:
    graphs: list[CompiledGraph] = []
    backend = Q4Backend({"pipeline": pipeline, "calibration": calibration, "progress": False, "lower": lower,
                         **options}, on_compiled=lambda graph, _inputs: graphs.append(graph))
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend=backend)(**run)
    torch._dynamo.reset()
    return out, graphs


def _count_linears(cell: Cell, graphs: list[CompiledGraph]) -> None:
    reasons: collections.Counter = collections.Counter()
    for graph in graphs:
        for node in graph.graph_module.graph.nodes:
            q = qlinear.match(node) or qlinear.match_grouped(node)  # a linear, or a grouped expert GEMM
            if q is not None and q.quantized:
                cell.quantized += 1
            elif q is not None or ir.FLOAT_REASON in node.meta:
                cell.in_float += 1
                reasons[node.meta.get(ir.FLOAT_REASON, "no pass took it")] += 1
    cell.reasons = dict(reasons)


def run_cell(family: str, dtype: str, recipe: str, lower: str = "eager", quick: bool = True) -> Cell:
    """Compile the tiny `family` model in `dtype` with `recipe` three ways and measure (see the module doc)."""
    cell = Cell(family, dtype, recipe)
    fam, torch_dtype = FAMILIES[family], DTYPES[dtype]
    start = time.perf_counter()
    try:
        model = fam.build(dtype=torch_dtype)
        calibration = [fam.inputs(seed) for seed in (1, 2)]
        run = fam.inputs(seed=3)
        pipeline = pipeline_of(recipe, quick)
        with torch.no_grad():
            expected = fam.output(model(**run))
            if torch_dtype == torch.float32:
                cell.exact_bound = EXACT_FP32
                reference = expected
            else:  # the half model's own rounding, measured against its fp32 copy
                reference = fam.output(fam.build(dtype=torch.float32)(**run))
                cell.exact_bound = max(EXACT_FP32, EXACT_HALF_FACTOR * max_relative_error(expected, reference))
        unrounded, _ = _compile_and_run(model, pipeline, calibration, run, lower, rounding=False)
        cell.exact_error = max_relative_error(fam.output(unrounded), reference)
        fused, graphs = _compile_and_run(model, pipeline, calibration, run, lower)
        fake, _ = _compile_and_run(model, pipeline, calibration, run, lower, disable="fuse-kernels")
        fused, fake = fam.output(fused).double(), fam.output(fake).double()
        cell.sqnr_db = sqnr_db(expected.double(), fused)
        cell.fake_sqnr_db = sqnr_db(expected.double(), fake)
        cell.fused_vs_fake_db = sqnr_db(fake, fused)
        cell.fused_bound_db = FUSED_VS_FAKE_FP32_DB if torch_dtype == torch.float32 else \
            cell.sqnr_db + FUSED_VS_FAKE_HALF_MARGIN_DB
        _count_linears(cell, graphs)
    except Exception as e:  # noqa: BLE001 - a matrix reports every failing cell, it does not stop at one
        cell.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    cell.seconds = time.perf_counter() - start
    return cell


def run_matrix(families: list[str], dtypes: list[str], recipes: list[str], lower: str = "eager",
               quick: bool = True, progress: bool = True) -> list[Cell]:
    cells = [(f, d, r) for f in families for d in dtypes for r in recipes]
    return [run_cell(f, d, r, lower, quick) for f, d, r in tqdm(cells, desc="zoo-matrix", disable=not progress)]


def _short(reasons: dict[str, int]) -> str:
    return "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items()))


def table(cells: list[Cell]) -> str:
    """The matrix as a table: one row per cell."""
    rows = [[c.family, c.dtype, c.recipe,
             "-" if c.exact_error is None else f"{c.exact_error:.1e}",
             "-" if c.fused_vs_fake_db is None else f"{c.fused_vs_fake_db:.1f}",
             "-" if c.sqnr_db is None else f"{c.sqnr_db:.1f}",
             f"{c.quantized}/{c.quantized + c.in_float}", f"{c.seconds:.1f}",
             "ok" if not c.problems() else "FAIL: " + "; ".join(c.problems())] for c in cells]
    text = tabulate(rows, headers=["family", "dtype", "recipe", "exact err", "fused vs fake dB", "SQNR dB",
                                   "quantized", "s", "check"])
    return text


def summary(cells: list[Cell]) -> str:
    """One row per family: the cells that pass per dtype, and the default recipe's linears."""
    dtypes = list(dict.fromkeys(c.dtype for c in cells))
    rows = []
    for family in dict.fromkeys(c.family for c in cells):
        mine = [c for c in cells if c.family == family]
        passing = [f"{sum(not c.problems() for c in mine if c.dtype == d)}/{sum(c.dtype == d for c in mine)}"
                   for d in dtypes]
        shown = next((c for c in mine if c.recipe == "w4a4" and not c.error), next(iter(mine)))
        rows.append([family, *passing, f"{shown.quantized}/{shown.quantized + shown.in_float}",
                     _short({r: n for r, n in shown.reasons.items() if "skip=" not in r}) or "-"])
    return tabulate(rows, headers=["family", *(f"{d} pass" for d in dtypes), "quantized (w4a4)",
                                   "left in float, and why (w4a4)"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile zoo-matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float32, float16, bfloat16")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma list of recipes (default: all)")
    parser.add_argument("--lower", default="eager", choices=("eager", "inductor"),
                        help="run the final graphs as they are (default) or through Inductor")
    parser.add_argument("--full-learning", action="store_true",
                        help="learn rotations with the recipes' own step counts (default: 8 steps)")
    args = parser.parse_args(argv)
    chosen = {}
    for name, known in (("families", FAMILIES), ("dtypes", DTYPES), ("recipes", RECIPES)):
        chosen[name] = [x for x in getattr(args, name).split(",") if x]
        unknown = [x for x in chosen[name] if x not in known]
        if unknown:
            parser.error(f"unknown {name}: {', '.join(unknown)} (known: {', '.join(known)})")
    cells = run_matrix(chosen["families"], chosen["dtypes"], chosen["recipes"], args.lower, not args.full_learning)
    print(table(cells))
    print("\n" + summary(cells))
    failed = [c for c in cells if c.problems()]
    print(f"\n{len(cells) - len(failed)} of {len(cells)} cells pass")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
