"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

import-linter reads the package from the file system, and qcompile's installed layout
(`qcompile.passes`, `qcompile.kernels`, `qcompile.backends`) is not the repository's
(`passes/`, `kernels/`, `backends/` at the top, mapped by pyproject's package-dir). So this
script lays the installed layout out in a temporary folder of symbolic links to the
repository's files and runs `lint-imports` there. Exit status: lint-imports' own (0: kept).

    python scripts/check_layers.py [--repo DIR]
    python scripts/check_layers.py --counts    # also: how many imports go from each layer to each
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# installed package -> the repository folder that holds it (pyproject's [tool.setuptools.package-dir])
SUBPACKAGE_FOLDERS = {"passes": "passes", "kernels": "kernels", "backends": "backends"}


def installed_layout(repo: Path, into: Path) -> Path:
    """`into/qcompile/...` as it installs: qcompile/'s entries plus the top-level subpackages."""
    package = into / "qcompile"
    package.mkdir()
    for entry in (repo / "qcompile").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve())
    for name, folder in SUBPACKAGE_FOLDERS.items():
        (package / name).symlink_to((repo / folder).resolve())
    return package


def layer_of(module: str, layers: list[str]) -> str:
    """The layer (`core`, `passes`, ...) a module `qcompile.core.ir` belongs to; '' for qcompile's own files."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in layers else ""


def import_counts(root: Path) -> str:
    """A table: for each layer, how many import statements of its modules name each other layer."""
    import grimp
    import tomllib
    from tabulate import tabulate

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        contract = tomllib.load(f)["tool"]["importlinter"]["contracts"][0]
    layers = [layer.split("#")[0].strip() for layer in contract["layers"]]
    sys.path.insert(0, str(root))
    graph = grimp.build_graph("qcompile", cache_dir=None)
    counts: dict[tuple[str, str], int] = {}
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            pair = (layer_of(importer, layers), layer_of(imported, layers))
            if all(pair) and pair[0] != pair[1]:
                lines = graph.get_import_details(importer=importer, imported=imported)
                counts[pair] = counts.get(pair, 0) + max(1, len(lines))
    rows = [[a] + [counts.get((a, b), "") for b in layers] for a in layers]
    return tabulate(rows, headers=["importer \\ imported"] + layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the repository root (default: this script's)")
    parser.add_argument("--counts", action="store_true",
                        help="also print how many imports go from each layer to each other layer")
    args = parser.parse_args(argv)
    lint_imports = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="qcompile-layers-") as tmp:
        installed_layout(args.repo, Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        # run from the folder: lint-imports puts its working directory first on sys.path
        if args.counts:
            print(import_counts(Path(tmp)))
        return subprocess.call([str(lint_imports), str(args.repo / "pyproject.toml"), "--no-cache"],
                               cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
