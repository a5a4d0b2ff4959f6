"""Pass instrumentation: hook objects the pass manager calls around each pass (TVM style).

Everything cross-cutting lives here, never in a pass: printing IR, dumping it to files,
verifying it, timing passes, reporting their statistics. The hooks, in the order the pass
manager calls them::

    on_stage(name, gm)                      a stage outside the pipeline (the backend's
                                            "capture", "normalize", ...) produced `gm`
    before_pass(index, qpass, gm)           pass number `index` of the pipeline is about to run
    after_pass(index, qpass, gm, result, seconds)   it returned `result` (a PassResult)
    on_failure(index, qpass, gm, exc)       it raised `exc` (or an instrument's after_pass did,
                                            e.g. VerifyEach), `gm` being the graph it left
    finish()                                the run is over (also after a failure): print reports

Subclass `Instrument` and override what you need. An instrument that prints writes to its
`stream`; one built without a stream is given the pass manager's (default `sys.stderr`).

Headers follow MLIR (`// -----// IR Dump After cse //----- //`) and name a pass with ALL its
effective options (`PassSpec.of`), so a header says exactly what ran.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterable, TextIO

from tabulate import tabulate
from torch import fx

from qcompile.pass_api import PassResult, QPass, get_pass_class
from qcompile.pipeline import PassSpec
from qcompile.verify import verify

__all__ = ["Instrument", "PrintIR", "DumpIR", "VerifyEach", "Timing", "Statistics", "ir_text"]


def ir_text(gm: fx.GraphModule) -> str:
    """The readable code of `gm`; a graph too broken to generate code for prints as its nodes."""
    try:
        return gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - a failing pass may leave a graph codegen rejects
        return str(gm.graph)


class Instrument:
    """Base of the instruments: every hook does nothing."""

    stream: TextIO | None = None

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        pass

    def before_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> None:
        pass

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        pass

    def on_failure(self, index: int, qpass: QPass, gm: fx.GraphModule, exc: BaseException) -> None:
        pass

    def finish(self) -> None:
        pass

    def write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr  # used without a manager
        stream.write(text if text.endswith("\n") else text + "\n")


class PrintIR(Instrument):
    """Print the IR around passes (MLIR's --print-ir-before/after/after-all/after-change/after-failure).

    `before` / `after` name passes; `after_all` also prints every stage. `after_change` on its own
    prints after each pass that reported a change; together with `after` / `after_all` it
    restricts them to passes that reported a change.
    """

    def __init__(self, before: Iterable[str] = (), after: Iterable[str] = (), after_all: bool = False,
                 after_change: bool = False, after_failure: bool = False, stream: TextIO | None = None):
        self.before, self.after = tuple(before), tuple(after)
        for name in self.before + self.after:
            get_pass_class(name)  # a misspelt pass name would otherwise print nothing, silently
        self.after_all, self.after_change, self.after_failure = after_all, after_change, after_failure
        self.stream = stream

    def dump(self, title: str, gm: fx.GraphModule) -> None:
        self.write(f"// -----// IR Dump {title} //----- //\n{ir_text(gm)}")

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        if self.after_all:
            self.dump(f"After {name}", gm)

    def before_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> None:
        if qpass.name in self.before:
            self.dump(f"Before {PassSpec.of(qpass)}", gm)

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        selected = self.after_all or self.after_change or qpass.name in self.after
        if selected and (result.modified or not self.after_change):
            self.dump(f"After {PassSpec.of(qpass)}", gm)

    def on_failure(self, index: int, qpass: QPass, gm: fx.GraphModule, exc: BaseException) -> None:
        if self.after_failure:
            self.dump(f"After {PassSpec.of(qpass)} Failed", gm)


class DumpIR(Instrument):
    """Write one file per stage and per pass: `000-capture.py`, `001-normalize.py`, ...,
    `00N-<pass-name>.py` (and `00N-<pass-name>-failed.py` for the graph a failing pass left).

    The index runs on across stages and passes (and across runs of the same instrument), so the
    files sort in the order the graphs were made. Existing files are overwritten, never deleted.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = 0

    def save(self, stem: str, header: str, gm: fx.GraphModule) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.index:03d}-{re.sub(r'[^0-9A-Za-z_.-]', '_', stem)}.py"
        self.index += 1
        comment = "".join(f"# {line}\n" for line in header.splitlines())
        path.write_text(comment + ir_text(gm))
        return path

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        self.save(name, f"IR after stage {name}", gm)

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        changed = "changed" if result.modified else "unchanged"
        self.save(qpass.name, f"IR after pass {PassSpec.of(qpass)} ({changed})", gm)

    def on_failure(self, index: int, qpass: QPass, gm: fx.GraphModule, exc: BaseException) -> None:
        self.save(f"{qpass.name}-failed", f"IR when pass {PassSpec.of(qpass)} failed:\n{type(exc).__name__}: {exc}", gm)


class VerifyEach(Instrument):
    """Run `qcompile.verify.verify` after each pass that reported a change.

    An unchanged graph was verified already (or is the input), so it is skipped, as in MLIR; a
    pass that changes the graph but reports modified=False escapes the check: that is its bug.
    """

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        if result.modified:
            verify(gm)


class Timing(Instrument):
    """Seconds per pass, printed as a table with percentages when the run finishes."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.rows: list[tuple[int, str, float]] = []

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        self.rows.append((index, qpass.name, seconds))

    def finish(self) -> None:
        if not self.rows:
            return
        total = sum(seconds for _, _, seconds in self.rows)
        table = [(i, name, seconds, 100.0 * seconds / total if total > 0 else 0.0)
                 for i, name, seconds in self.rows]
        table.append(("", "total", total, 100.0))
        self.write("// -----// Pass execution timing report //----- //\n"
                   + tabulate(table, headers=("#", "pass", "seconds", "%"), floatfmt=("", "", ".4f", ".1f")))
        self.rows = []


class Statistics(Instrument):
    """Each pass's named counters (`qpass.stats`), printed as a table when the run finishes
    (MLIR's -mlir-pass-statistics). Passes that declare no statistics are left out."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.rows: list[tuple[int, str, str, int]] = []

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        self.rows.extend((index, qpass.name, stat, count) for stat, count in qpass.stats.items())

    def finish(self) -> None:
        if not self.rows:
            return
        self.write("// -----// Pass statistics report //----- //\n"
                   + tabulate(self.rows, headers=("#", "pass", "statistic", "value")))
        self.rows = []
