"""Recipes: named pass pipelines. A recipe is only a pipeline string; the passes do the work.

`options={"recipe": "w4a4-rtn"}` runs the recipe's pipeline; `options={"pipeline": "..."}` (or
`Q4_PIPELINE`) replaces it with any pipeline string.
"""

from __future__ import annotations

RECIPES: dict[str, str] = {
    # Round-to-nearest W4A4: per-output-channel symmetric int4 weights, static per-tensor int4
    # activations from calibration absmax, fused integer kernels. The baseline every other
    # W4A4 recipe is measured against. analyze-outliers only records meta (for the report).
    "w4a4-rtn": "analyze-outliers,fold-scales,insert-quantizers{w-bits=4,a-bits=4},fuse-kernels",
    # SmoothQuant (alpha 0.5) migration into the norms before q/k/v and gate/up, then W4A4.
    "w4a4-smoothquant": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,"
    "insert-quantizers{w-bits=4,a-bits=4},fuse-kernels",
    # The default: migrate half of each channel's range into the weights (alpha 0.5, into the
    # norms, up_proj rows and a multiply on o_proj's input), rotate every linear's input by an
    # orthogonal Kronecker product learned for its layer (120 Adam steps on the layer's quantized
    # output error, from the Hadamard-like factors; down_proj keeps those: its learning took 40% of
    # the time for the least gain), search each layer's activation clipping ratio on calibration
    # samples, and round weights with GPTQ. The language-model head gets 4-bit weights too, with
    # 8-bit activations: in float it was a quarter of SmolLM2's prefill time. Each sequence's first
    # token (its attention sink, hundreds of times the others' range) has 8-bit codes and a static
    # step of its own (`sinks=true`). Each group of 32 k of a weight row steps by an integer multiple
    # of the row's step (`w-group=32`, still exact integer kernels): on the same 2048 tokens 27.33
    # against 27.77 with a step per row; MiniLM 0.9596 against 0.9553 (20 sentences).
    # SmolLM2-135M, 2048 P&P tokens, 4 x 512 calibration tokens, 2 threads: 28.23 (1.36x FP32
    # 20.83) against 29.00 (1.39x) with the fixed rotation (w4a4-hadamard); before the first
    # token's own step, 33.15 and 36.43; learning down_proj too (and 1024 weight rows a step) gave
    # 32.26 then, at twice the quantize time.
    "w4a4": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,"
    "rotate-inputs{skip=,learn-steps=120,learn-rate=0.02,learn-skip=down_proj},"
    "insert-quantizers{w-bits=4,a-bits=4,search-clip=true,weights=gptq,sinks=true,w-group=32},"
    "insert-quantizers{only=lm_head,skip=,w-bits=4,a-bits=8,search-clip=true,weights=gptq,sinks=true,w-group=32},fuse-kernels",
    # w4a4 with the fixed Hadamard-like rotation (no learning: the default until learned rotations;
    # a third of its quantize time). The searched QSM strength (`migrate-scales{rotated=true}`)
    # gave 56.4 here against the fixed 0.5's 36.9, so the fixed 0.5 it is.
    "w4a4-hadamard": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,rotate-inputs{skip=},"
    "insert-quantizers{w-bits=4,a-bits=4,search-clip=true,weights=gptq,sinks=true,w-group=32},"
    "insert-quantizers{only=lm_head,skip=,w-bits=4,a-bits=8,search-clip=true,weights=gptq,sinks=true,w-group=32},fuse-kernels",
    # w4a4-hadamard with MergeQuant's dimensional reconstruction: each group's widest channels split
    # into copies (at most 16 more input channels), chosen by the output error as the fixed
    # rotation will leave the group.
    "w4a4-split": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},split-channels{budget=16,rotated=true},"
    "fold-scales,rotate-inputs{skip=},"
    "insert-quantizers{w-bits=4,a-bits=4,search-clip=true,weights=gptq,sinks=true,w-group=32},"
    "insert-quantizers{only=lm_head,skip=,w-bits=4,a-bits=8,search-clip=true,weights=gptq,sinks=true,w-group=32},fuse-kernels",
    # QSM as MergeQuant describes it, without rotation: per group, the migration strength and
    # the activation clipping ratio searched against the layer-output error.
    "w4a4-qsm": "analyze-outliers,migrate-scales{method=qsm,w-bits=4,a-bits=4},fold-scales,"
    "insert-quantizers{w-bits=4,a-bits=4,search-clip=true,weights=gptq},fuse-kernels",
    # The same as w4a4 with 8-bit static activations (the fused W4A4 kernel multiplies any int8 codes).
    # Groups of 32: 22.19 against 23.00 with a step per row (2048 tokens, as w4a4's).
    "w4a8": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,rotate-inputs,"
    "insert-quantizers{w-bits=4,a-bits=8,search-clip=true,weights=gptq,sinks=true,w-group=32},fuse-kernels",
    # LLM-FP4 (Liu et al. 2023) on the integer kernels: the passes of w4a4, with 4-bit float codes
    # (qcompile/kernels/formats.py). Per linear, the weight's and the activation's format (E2M1, E3M0, E1M2)
    # and the activation's clipping ratio (its exponent bias) are searched against the layer-output
    # error, alternating as the paper does; the weight's per-channel exponent bias is its GPTQ step.
    # The head keeps w4a4's 8-bit integer activations. SmolLM2-135M, 2048 P&P tokens, 4 x 512
    # calibration tokens, eager lowering: 33.33 (1.600x FP32 20.83), w4a4 37.60 (1.805x).
    "fp4": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,rotate-inputs{skip=},"
    "insert-quantizers{w-format=search,a-format=search,search-clip=true,weights=gptq,sinks=true,w-group=32},"
    "insert-quantizers{only=lm_head,skip=,w-bits=4,a-bits=8,search-clip=true,weights=gptq,sinks=true,w-group=32},fuse-kernels",
    # The same with E2M1 alone on both sides (the FP4 of MXFP4 / NVFP4 hardware): no format search,
    # a third of the quantize time; 33.22 (1.595x) on the same 2048 tokens.
    "fp4-e2m1": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,rotate-inputs{skip=},"
    "insert-quantizers{w-format=e2m1,a-format=e2m1,search-clip=true,weights=gptq,sinks=true,w-group=32},"
    "insert-quantizers{only=lm_head,skip=,w-bits=4,a-bits=8,search-clip=true,weights=gptq,sinks=true,w-group=32},fuse-kernels",
    # The dynamic reference of w4a4: the same passes, each token's activation step computed at run
    # time from its own absmax (q4.token_steps, fused into the loop that rotates and quantizes;
    # the epilogue multiplies by a_step[token] * w_step[n]). It shows what static steps cost.
    "w4a4-dynamic": "analyze-outliers,migrate-scales{method=smoothquant,alpha=0.5},fold-scales,rotate-inputs{skip=},"
    "insert-quantizers{w-bits=4,a-bits=4,activations=dynamic,weights=gptq,w-group=32},"
    "insert-quantizers{only=lm_head,skip=,w-bits=4,a-bits=8,activations=dynamic,weights=gptq,w-group=32},fuse-kernels",
    # Weight-only int4 with GPTQ in groups of 32 (activations stay in float): the fused q4.linear_w4a16.
    "w4a16": "analyze-outliers,fold-scales,insert-quantizers{w-bits=4,a-bits=16,weights=gptq,w-group=32},fuse-kernels",
}

DEFAULT_RECIPE = "w4a4"


def recipe_pipeline(name: str) -> str:
    """The pipeline string of a recipe; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]
