"""Which linears a pass takes: the one reading of the `skip=` and `only=` options.

    linears = LinearFilter(skip=options.skip, only=options.only)
    if linears.skips(node): ...              # skip matches: leave it alone
    if not linears.takes(node): ...          # skipped, or not matched by `only`

Both are regexes searched in the linear's module path, `ir.linear_module_path`: the path of the
module that calls the linear (`model.layers.0.mlp.up_proj`, `lm_head`), or, when the graph does not
record it, its weight's name. The linear's own module comes first so that a language-model head
whose weight is tied to the embedding is still `lm_head` (its weight is named
`model.embed_tokens.weight`): `skip=lm_head` means the head in every pass. An empty regex matches
nothing for `skip` and everything for `only`.
"""

from __future__ import annotations

import dataclasses
import re

from torch import fx

from qcompile.core import ir

__all__ = ["LinearFilter"]


@dataclasses.dataclass(frozen=True)
class LinearFilter:
    skip: str = ""
    only: str = ""

    def __post_init__(self) -> None:
        # compiled once: the patterns are searched for every linear
        object.__setattr__(self, "_skip", re.compile(self.skip) if self.skip else None)
        object.__setattr__(self, "_only", re.compile(self.only) if self.only else None)

    @staticmethod
    def path(node: fx.Node) -> str:
        """The module path the patterns are searched in."""
        return ir.linear_module_path(node)

    def skips(self, node: fx.Node) -> bool:
        """Whether `skip` matches the linear."""
        return self._skip is not None and self._skip.search(self.path(node)) is not None

    def selects(self, node: fx.Node) -> bool:
        """Whether `only` matches the linear (an empty `only` matches every linear)."""
        return self._only is None or self._only.search(self.path(node)) is not None

    def takes(self, node: fx.Node) -> bool:
        """Whether the pass takes the linear: `only` matches it and `skip` does not."""
        return self.selects(node) and not self.skips(node)
