"""docs/writing-a-pass.md: every Python snippet is real code, copied from a file that runs in CI."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-a-pass.md"
SOURCES = ["examples/custom_pass.py", "tests/passes/test_pass_template.py", "tests/qcompile/test_patterns.py",
           "qcompile/passes/fuse_kernels.py"]


def test_custom_pass_guide_snippets_are_copied_from_code_that_runs():
    snippets = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(snippets) >= 8
    sources = {name: (ROOT / name).read_text() for name in SOURCES}
    for snippet in snippets:
        assert any(snippet in text for text in sources.values()), f"not found in {SOURCES}:\n{snippet}"


def test_custom_pass_guide_names_the_real_pass_and_test():
    guide = GUIDE.read_text()
    assert "examples/custom_pass.py" in guide and "tests/passes/test_pass_template.py" in guide
    failure_lines = re.search(r"```text\n(pass test-fail failed.*?)```", guide, flags=re.S).group(1)
    tests = (ROOT / "tests" / "qcompile" / "test_pass_manager.py").read_text()
    for line in failure_lines.splitlines():  # the PassFailure shown is the one the test expects
        assert repr(line) in tests or f'"{line}"' in tests, line


def test_custom_pass_guide_shows_the_template_graph_as_capture_makes_it():
    # the template is the guide's subject (run as a file, as a reader runs their copy), not a helper
    graph = runpy.run_path(str(ROOT / "tests" / "passes" / "test_pass_template.py"))["graph"]
    shown = re.search(r"```text\n(def forward.*?)```", GUIDE.read_text(), flags=re.S).group(1)
    code = graph().code
    for line in shown.splitlines():
        assert line in code, line
