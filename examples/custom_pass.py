"""A pass written outside qcompile, put into the pipeline by name.

    python examples/custom_pass.py            # its graph before and after, and its statistics
    qcompile passes --import examples/custom_pass.py    # it is listed beside qcompile's passes

`remove-eval-dropout` deletes `aten.dropout(x, p, train=False)`: the identity in an eval-mode
graph, but a node between a norm and the linears it feeds (a one-layer BERT graph holds 3), which
any pass matching "norm -> linear" would have to look through. It is a pattern rewrite
(`qcompile.core.patterns.PatternPass`): the pattern, its replacement and a check of each match are all
it writes; `register_pass` makes it a name the pipeline string, `Q4_PRINT_AFTER` and
`qcompile passes` know. The graph printed is the backend's own (`print_before` / `print_after`
options). `docs/writing-a-pass.md` walks through it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from qcompile.core import ir
from qcompile.core.pass_api import option, register_pass
from qcompile.core.patterns import PatternMatch, PatternPass
from qcompile.core.recipes import recipe_pipeline

aten = torch.ops.aten


@dataclass(frozen=True)
class RemoveEvalDropoutOptions:
    only: str = option("", help="remove only the dropouts whose module path contains this text ('' = all)")


@register_pass
class RemoveEvalDropout(PatternPass):
    name = "remove-eval-dropout"
    summary = "Delete aten.dropout(x, p, train=False), the identity in eval mode."
    Options = RemoveEvalDropoutOptions
    statistics = ("dropouts-removed", "dropouts-kept")  # rewrites count in the first one

    def pattern(self, x, p):
        return aten.dropout.default(x, p, False)  # train=False: a literal, matched exactly

    def replacement(self, x, p):  # the pattern's parameters, in the same order
        return x

    def check(self, match: PatternMatch) -> bool:
        if self.options.only in ir.module_path(match.anchor):
            return True
        self.count("dropouts-kept")
        return False


def main() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 128, (2, 8))
    pipeline = "remove-eval-dropout," + recipe_pipeline("w4a4-rtn")
    compiled = torch.compile(model, backend="q4", options={
        "pipeline": pipeline, "calibration": [{"input_ids": ids}], "progress": False, "lower": "eager",
        "print_before": ("remove-eval-dropout",), "print_after": ("remove-eval-dropout",), "stats": True})
    with torch.no_grad():
        out = compiled(input_ids=ids).last_hidden_state
        reference = model(input_ids=ids).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
    from qcompile.backends import q4

    print(f"pipeline: {q4.compiled_graphs()[-1].pipeline}")  # what ran: Q4_PIPELINE / Q4_DISABLE may change it
    print(f"cosine(q4 output, FP32 output) = {cosine:.4f}")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
