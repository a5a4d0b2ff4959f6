"""Golden text of `qcompile.core.printer`: SmolLM2-135M's first decoder layer after the default recipe.

The real SmolLM2-135M (`qcompile.tools.zoo.load_smollm2`), cut to its first 2 decoder layers, compiled
with `backend="q4"` and the default recipe (`w4a4`), calibrated on 2 x 64 tokens of Emma, called
once on a 6-token prompt; `format_graph(final graph, module="model.layers.0")` must equal
`tests/golden/smollm2_decoder_layer.txt` line for line. On a mismatch the assertion shows the
unified diff (expected -> printed).

When the printer, a pass or the recipe changes the text on purpose, rewrite the file and review
its diff like code:

    Q4_UPDATE_GOLDEN=1 python -m pytest tests/examples/test_golden_print.py

Under CI (the `CI` environment variable set) the switch is an error: CI checks the text, it never
accepts a change.

To keep the test fast and the text stable: the head keeps its first 1024 vocabulary rows (the
default recipe quantizes the head with GPTQ, which over all 49152 rows takes most of the time;
the head is not printed), the KV cache is off (`use_cache=False`: the graph has no cache
concatenation), lowering is `eager` (the printed graph is the one the passes leave, before
lowering), and every `Q4_*` variable of the environment is set aside, so that only this test's
options apply. The text holds no absolute path, no address, and numbers with 3 significant digits.

The numbers in a quantized linear's braces (`{w_step min 0.00067 ... a_step 0.0522 ...}`) come out of
learned rotations and GPTQ, optimizations whose float sums the CPU orders its own way (AVX2 against
AVX-512/AMX): two machines print them a few percent apart. So the text is compared with those
numbers masked, and each number on its own must be within 1.5x of the golden one: the layout is
checked to the character, the values to what the machine allows (the model-level accuracy tests
bound them where it matters).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "smollm2_decoder_layer.txt"
UPDATE = "Q4_UPDATE_GOLDEN"
HEAD_ROWS = 1024
# a number in a quantized linear's `{...}` statistics: 0.00067, 4, 1e-05
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_BRACES = re.compile(r"\{[^{}]*\}")
# how far apart two CPUs may print a statistic (measured, AVX2 against AMX: steps up to 15%, a group's x4 against x5)
MACHINE_FACTOR = 1.5


def statistics_masked(text: str) -> tuple[str, list[float]]:
    """`text` with every number inside `{...}` replaced by `#`, and those numbers in order."""
    numbers: list[float] = []

    def mask(braces: re.Match) -> str:
        numbers.extend(float(n) for n in _NUMBER.findall(braces.group()))
        return _NUMBER.sub("#", braces.group())

    return _BRACES.sub(mask, text), numbers


def update_requested() -> bool:
    """Whether the update switch asks to rewrite the golden text; under CI, an AssertionError."""
    if os.environ.get(UPDATE, "") in ("", "0"):
        return False
    if os.environ.get("CI", "") not in ("", "0", "false"):
        raise AssertionError(f"{UPDATE} is set under CI: CI checks the golden text against {GOLDEN.name}, "
                             "it does not rewrite it; update it locally and commit the reviewed diff")
    return True


def _two_layer_smollm2(smollm2):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)  # the session's SmolLM2 is shared: cut a copy
    model.model.layers = model.model.layers[:2]  # LlamaModel runs layers[: config.num_hidden_layers]
    model.config.num_hidden_layers = 2
    model.config.use_cache = False
    head = torch.nn.Linear(model.config.hidden_size, HEAD_ROWS, bias=False)
    head.weight = torch.nn.Parameter(model.lm_head.weight[:HEAD_ROWS].detach().clone())
    model.lm_head = head
    return model.eval(), tokenizer


def printed_layer(smollm2) -> str:
    from qcompile.backends import q4
    from qcompile.core.printer import format_graph
    from qcompile.tools import zoo

    model, tokenizer = _two_layer_smollm2(smollm2)
    calibration = [{"input_ids": ids} for ids in zoo.token_windows(tokenizer, "emma", 128, 64)]
    prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    compiled = torch.compile(model, backend="q4",
                             options={"calibration": calibration, "progress": False, "lower": "eager"})
    with torch.no_grad():
        compiled(input_ids=prompt)
    return format_graph(q4.compiled_graphs()[-1].graph_module, module="model.layers.0")


@pytest.mark.model
def test_smollm2_decoder_layer_prints_as_the_golden_text(monkeypatch, smollm2):
    update = update_requested()
    for name in [n for n in os.environ if n.startswith("Q4_")]:
        monkeypatch.delenv(name)  # the user's Q4_RECIPE, Q4_PRINT_*... must not change the text
    text = printed_layer(smollm2)
    if update:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        return
    expected = GOLDEN.read_text()
    (layout, numbers), (expected_layout, expected_numbers) = statistics_masked(text), statistics_masked(expected)
    far = [(got, want) for got, want in zip(numbers, expected_numbers)
           if not want / MACHINE_FACTOR <= got <= want * MACHINE_FACTOR]
    if layout != expected_layout or far:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), text.splitlines(),
                                              f"expected {GOLDEN.name}", "printed", lineterm=""))
        raise AssertionError(f"the printed layer differs from {GOLDEN} "
                             f"(rerun with {UPDATE}=1 to accept the change)"
                             f"{f'; statistics more than {MACHINE_FACTOR}x off (printed, golden): {far}' if far else ''}"
                             f":\n{diff}")
    # what the golden text shows off: every quantized linear of the layer on one line
    assert text.count("= linear W4A4 int(") == 7
    assert "q4.quantize_per_tensor" not in text and "q4.dequantize" not in text


def test_statistics_masking_keeps_the_layout_and_reads_the_numbers():
    line = "%l: f32[1, 6, 576] = linear W4A4 int(%x, w[576, 576]) {w_step min 0.00067 med 1e-05, x4..15}  # m.py:3"
    layout, numbers = statistics_masked(line)
    assert layout == "%l: f32[1, 6, 576] = linear W4A4 int(%x, w[576, 576]) {w_step min # med #, x#..#}  # m.py:3"
    assert numbers == [0.00067, 1e-05, 4.0, 15.0]


def test_the_update_switch_fails_under_ci(monkeypatch):
    monkeypatch.setenv(UPDATE, "1")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(AssertionError, match=f"{UPDATE} is set under CI"):
        update_requested()
    monkeypatch.delenv("CI")
    assert update_requested()
    monkeypatch.setenv(UPDATE, "0")
    assert not update_requested()
