"""Recipes for tests on the real models whose subject is not the learning of rotations.

The default recipe learns each layer's rotation by 120 gradient steps (about two minutes on
SmolLM2, 2 threads); a test that checks structure, printing or bit-exactness through the KV cache
gets the same passes, learned factors and kernels from a few steps. Tests of accuracy run the
recipe as it is.
"""

from __future__ import annotations

from qcompile.core.pipeline import parse_pipeline
from qcompile.core.recipes import RECIPES

QUICK_LEARN_STEPS = 8


def quick(recipe: str = "w4a4", steps: int = QUICK_LEARN_STEPS) -> str:
    """The pipeline of `recipe` with its rotations learned by `steps` steps (rate 0.05, to move in so few)."""
    pipeline = parse_pipeline(RECIPES[recipe])
    if "learn-steps" not in next((s.raw_options for s in pipeline if s.name == "rotate-inputs"), {}):
        raise ValueError(f"recipe {recipe!r} learns no rotation")
    return str(pipeline.with_option("rotate-inputs", "learn-steps", str(steps))
               .with_option("rotate-inputs", "learn-rate", "0.05"))
