"""qcompile/passes/README.md's table of passes is generated from the registry; this test fails when it drifts.

Rewrite the table after changing a pass's declaration (name, summary, options, statistics, ordering):

    python -m tests.passes.test_readme_table

Only the text between the BEGIN and END comments is generated; the rest of the README is prose.
"""

from __future__ import annotations

import re
from pathlib import Path

import qcompile.passes  # noqa: F401  (declares the built-in passes)
from qcompile.core.pass_api import markdown_table, registry

README = Path(__file__).resolve().parents[2] / "qcompile" / "passes" / "README.md"
BEGIN = "<!-- BEGIN passes table: generated from the registry; rewrite with `python -m tests.passes.test_readme_table` -->"
END = "<!-- END passes table -->"
_TABLE = re.compile(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), re.DOTALL)


def own_passes() -> dict:
    """qcompile's own passes: not the ones tests or users register."""
    return {name: cls for name, cls in registry().items() if cls.__module__.startswith("qcompile.passes.")}


def expected_readme(text: str) -> str:
    if not _TABLE.search(text):
        raise AssertionError(f"{README} has no table between {BEGIN!r} and {END!r}")
    return _TABLE.sub(lambda _: f"{BEGIN}\n{markdown_table(own_passes())}{END}", text)


def test_readme_table_is_the_registrys():
    text = README.read_text()
    assert text == expected_readme(text), "qcompile/passes/README.md's table drifted from the registry; rewrite it with " \
                                          "`python -m tests.passes.test_readme_table`"


def test_the_table_has_one_row_per_pass_with_its_declarations():
    table = markdown_table(own_passes())
    rows = table.splitlines()[2:]
    assert len(rows) == len(own_passes())
    assert any(row.startswith("| `insert-quantizers{w-bits=4,a-bits=4,skip=lm_head,") for row in rows)
    fuse = next(row for row in rows if row.startswith("| `fuse-kernels` |"))
    assert fuse.endswith("| `linears-fused`, `linears-not-fused` | `insert-quantizers` | - "
                         "| `fake-quant-linears-are-fused` |")
    # pipeline order: a pass comes after every pass it must run after
    names = [row.split("`")[1].split("{")[0] for row in rows]
    assert names.index("migrate-scales") < names.index("rotate-inputs") < names.index("insert-quantizers") \
        < names.index("fuse-kernels")


if __name__ == "__main__":
    README.write_text(expected_readme(README.read_text()))
    print(f"rewrote the table of {README}")
