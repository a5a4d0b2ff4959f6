"""Recipes: named pass pipelines. A recipe is only a pipeline string; the passes do the work.

`options={"recipe": "w4a4-rtn"}` runs the recipe's pipeline; `options={"pipeline": "..."}` (or
`Q4_PIPELINE`) replaces it with any pipeline string.
"""

from __future__ import annotations

RECIPES: dict[str, str] = {
    # Round-to-nearest W4A4: per-output-channel symmetric int4 weights, static per-tensor int4
    # activations from calibration absmax, fused integer kernels. The baseline every other
    # W4A4 recipe is measured against. analyze-outliers only records meta (for the report).
    "w4a4-rtn": "analyze-outliers,insert-quantizers{w-bits=4,a-bits=4},fuse-kernels",
    # SmoothQuant (alpha 0.5) migration into the norms before q/k/v and gate/up, then W4A4.
    "w4a4-smoothquant": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},"
    "insert-quantizers{w-bits=4,a-bits=4},fuse-kernels",
    # MergeQuant-style QSM: per group, the migration strength and the activation clipping ratio
    # searched on calibration samples against the layer-output error; clipping searched for the
    # linears no norm or producing linear precedes (o_proj).
    "w4a4": "analyze-outliers,migrate-scales{method=qsm,w-bits=4,a-bits=4},"
    "insert-quantizers{w-bits=4,a-bits=4,search-clip=true},fuse-kernels",
    # The same with 8-bit static activations; no fused kernel yet, so it runs fake-quantized.
    "w4a8": "analyze-outliers,migrate-scales{method=qsm,w-bits=4,a-bits=8},"
    "insert-quantizers{w-bits=4,a-bits=8,search-clip=true},fuse-kernels",
    # Weight-only int4 (activations stay in float); runs fake-quantized until its kernel lands.
    "w4a16": "analyze-outliers,insert-quantizers{w-bits=4,a-bits=16},fuse-kernels",
}

DEFAULT_RECIPE = "w4a4-rtn"


def recipe_pipeline(name: str) -> str:
    """The pipeline string of a recipe; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]
