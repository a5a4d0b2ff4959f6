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
effective options (`PassSpec.of`), so a header says exactly what ran. Graphs print as
`qcompile.core.printer.format_graph` writes them: one line per node, one line per quantized linear.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from tabulate import tabulate
from torch import fx

from qcompile.core.pass_api import PassResult, QPass, get_pass_class
from qcompile.core.pipeline import PassSpec
from qcompile.core.printer import format_graph
from qcompile.core.verify import verify

__all__ = ["Instrument", "PrintIR", "DumpIR", "VerifyEach", "Timing", "Statistics", "Memory", "ir_text", "status_bytes"]


def ir_text(gm: fx.GraphModule, provenance: bool = False) -> str:
    """`gm` as `qcompile.core.printer.format_graph` prints it (`provenance`: which pass made each node).

    A graph too broken for the printer (a failing pass may leave one) prints as torch.fx's
    generated code after a line saying why, or failing that as its bare node list.
    """
    try:
        return format_graph(gm, provenance=provenance)
    except Exception as exc:  # noqa: BLE001 - the graph may be in any state
        note = f"# qcompile.core.printer failed ({type(exc).__name__}: {exc}); torch.fx's form follows\n"
    try:
        return note + gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - nor may codegen accept it
        return note + str(gm.graph)


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

    `before` / `after` name passes; `after_all` prints after every pass and every stage;
    `after_failure` prints the graph a failing pass left.

    `after_change` prints what each pass CHANGED: a unified diff (difflib) of the printed graph
    before and after the pass, under `// -----// IR Diff After <pass{options}> //----- //`; a pass
    that changed nothing prints nothing. On its own it covers every pass; with `after` only the
    named passes, which then print as diffs instead of whole graphs; with `after_all` every pass
    prints as a diff, and the stages (capture, normalize, freeze: the starting point of the
    diffs) print whole. "Changed" means the printed text differs or the pass reported a change;
    a pass that reported a change the text does not show (new constant values only) prints a
    one-line note, one that changed the text but reported none prints its diff with a warning.

    `provenance`: every printed graph shows which pass created each node (`[by PASS from ...]`).
    """

    def __init__(self, before: Iterable[str] = (), after: Iterable[str] = (), after_all: bool = False,
                 after_change: bool = False, after_failure: bool = False, stream: TextIO | None = None,
                 provenance: bool = False):
        self.before, self.after = tuple(before), tuple(after)
        for name in self.before + self.after:
            get_pass_class(name)  # a misspelt pass name would otherwise print nothing, silently
        self.after_all, self.after_change, self.after_failure = after_all, after_change, after_failure
        self.stream = stream
        self.provenance = provenance
        self._text_before: str | None = None  # the graph a pass printed as a diff started from

    def text(self, gm: fx.GraphModule) -> str:
        return ir_text(gm, self.provenance)

    def dump(self, title: str, gm: fx.GraphModule) -> None:
        self.write(f"// -----// IR Dump {title} //----- //\n{self.text(gm)}")

    def selected_after(self, name: str) -> bool:
        """Whether pass `name` prints after it runs (whole, or as a diff with after_change)."""
        if self.after_all:
            return True
        if self.after:
            return name in self.after
        return self.after_change

    def diff(self, spec: PassSpec, before: str, after: str, reported: bool) -> None:
        if before == after and not reported:
            return  # nothing changed: nothing to print
        lines = [f"// -----// IR Diff After {spec} //----- //"]
        if before == after:
            lines.append("(the pass reported a change the printed graph does not show: constant values or meta)")
        else:
            if not reported:
                lines.append("(warning: the pass changed the graph but reported modified=False)")
            lines.extend(difflib.unified_diff(before.splitlines(), after.splitlines(), f"before {spec}",
                                              f"after {spec}", lineterm=""))
        self.write("\n".join(lines))

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        if self.after_all:
            self.dump(f"After {name}", gm)

    def before_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> None:
        if qpass.name in self.before:
            self.dump(f"Before {PassSpec.of(qpass)}", gm)
        # passes change the graph in place: its text before the pass is taken now
        self._text_before = self.text(gm) if self.after_change and self.selected_after(qpass.name) else None

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        if not self.selected_after(qpass.name):
            return
        if self.after_change and self._text_before is not None:
            self.diff(PassSpec.of(qpass), self._text_before, self.text(gm), bool(result.modified))
            self._text_before = None
        elif not self.after_change:
            self.dump(f"After {PassSpec.of(qpass)}", gm)

    def on_failure(self, index: int, qpass: QPass, gm: fx.GraphModule, exc: BaseException) -> None:
        if self.after_failure:
            self.dump(f"After {PassSpec.of(qpass)} Failed", gm)


class DumpIR(Instrument):
    """Write one file per stage and per pass: `000-capture.txt`, `001-normalize.txt`, ...,
    `00N-<pass-name>.txt` (and `00N-<pass-name>-failed.txt` for the graph a failing pass left),
    each the printed graph (`ir_text`) under `#` lines naming the stage or pass.

    The index runs on across stages and passes (and across runs of the same instrument), so the
    files sort in the order the graphs were made. Existing files are overwritten, never deleted.
    """

    def __init__(self, directory: str | Path, provenance: bool = False):
        self.directory = Path(directory)
        self.index = 0
        self.provenance = provenance

    def save(self, stem: str, header: str, gm: fx.GraphModule) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.index:03d}-{re.sub(r'[^0-9A-Za-z_.-]', '_', stem)}.txt"
        self.index += 1
        comment = "".join(f"# {line}\n" for line in header.splitlines())
        path.write_text(comment + ir_text(gm, self.provenance))
        return path

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        self.save(name, f"IR after stage {name}", gm)

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        changed = "changed" if result.modified else "unchanged"
        self.save(qpass.name, f"IR after pass {PassSpec.of(qpass)} ({changed})", gm)

    def on_failure(self, index: int, qpass: QPass, gm: fx.GraphModule, exc: BaseException) -> None:
        self.save(f"{qpass.name}-failed", f"IR when pass {PassSpec.of(qpass)} failed:\n{type(exc).__name__}: {exc}", gm)


class VerifyEach(Instrument):
    """Run `qcompile.core.verify.verify` after each pass that reported a change.

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


def status_bytes(field: str) -> int | None:
    """A size line of /proc/self/status (VmRSS: resident now; VmHWM: the process's peak) in bytes;
    None without /proc (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None


class Memory(Instrument):
    """Resident memory after each stage and pass, and the process's peak so far, printed as a table
    when the run finishes; a row where the peak rose says the stage or pass (or the calibration
    before the first pass) that set it. Read only, never reset (a benchmark's own peak stays whole),
    so a pass whose temporaries stay below an earlier peak does not show. Linux (/proc); elsewhere
    it says it cannot measure."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.rows: list[tuple[str, int | None, int | None]] = []

    def _record(self, label: str) -> None:
        self.rows.append((label, status_bytes("VmRSS"), status_bytes("VmHWM")))

    def on_stage(self, name: str, gm: fx.GraphModule) -> None:
        self._record(name)

    def before_pass(self, index: int, qpass: QPass, gm: fx.GraphModule) -> None:
        if index == 0 and self.rows and self.rows[-1][0] == "freeze":
            self._record("calibrate")  # prepare reports "freeze", then calibrates

    def after_pass(self, index: int, qpass: QPass, gm: fx.GraphModule, result: PassResult, seconds: float) -> None:
        self._record(f"{index} {qpass.name}")

    def finish(self) -> None:
        if not self.rows:
            return
        if self.rows[0][1] is None:
            self.write("// -----// Memory report //----- //\n(no /proc/self/status here: nothing measured)")
        else:
            mib, table, peak = 2**20, [], self.rows[0][2]  # rises after the first row
            for label, resident, high in self.rows:
                table.append((label, resident / mib, high / mib, "peak rose" if high >= peak + mib else ""))
                peak = max(peak, high)
            self.write("// -----// Memory report (resident MiB) //----- //\n"
                       + tabulate(table, headers=("after", "resident", "process peak so far", ""), floatfmt=".0f"))
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
