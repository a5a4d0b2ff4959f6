"""A pass written outside qcompile, put into the pipeline by name.

    python examples/custom_pass.py            # its graph before and after, and its statistics
    qcompile passes --import examples/custom_pass.py    # it is listed beside qcompile's passes

`remove-eval-dropout` deletes `aten.dropout(x, p, train=False)`: the identity in an eval-mode
graph, but a node between a norm and the linears it feeds (a one-layer BERT graph holds 3), which
any pass matching "norm -> linear" would have to look through. Declaring it is all there is:
a kebab-case name, a one-line summary, named statistics, and `call(gm) -> PassResult`;
`register_pass` makes it a name the pipeline string, `Q4_PRINT_AFTER` and `qcompile passes`
know. The graph printed is the backend's own (`print_before` / `print_after` options).
"""

from __future__ import annotations

import sys

import torch
from torch import fx

from qcompile.pass_api import PassResult, QPass, register_pass
from qcompile.recipes import recipe_pipeline

aten = torch.ops.aten


@register_pass
class RemoveEvalDropout(QPass):
    name = "remove-eval-dropout"
    summary = "Delete aten.dropout(x, p, train=False), the identity in eval mode."
    statistics = ("dropouts-removed",)

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in self.nodes(gm):  # (self.nodes: a failure names the node it was at)
            if node.op == "call_function" and node.target is aten.dropout.default and node.args[2] is False:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                self.count("dropouts-removed")
        if self.stats.get("dropouts-removed"):
            gm.recompile()
        return PassResult(gm, bool(self.stats.get("dropouts-removed")))


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
    print(f"pipeline: {pipeline}")
    print(f"cosine(q4 output, FP32 output) = {cosine:.4f}")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
