"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

import-linter reads the package from the file system: this runs `lint-imports` in the repository
(or the copy given by --repo), whose qcompile/ is the package as it installs. Exit status:
lint-imports' own (0: kept).

    python scripts/check_layers.py [--repo DIR]
    python scripts/check_layers.py --counts    # also: how many imports go from each layer to each
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


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
    repo = args.repo.resolve()
    if args.counts:
        print(import_counts(repo))
    # run from the repository: lint-imports puts its working directory first on sys.path
    return subprocess.call([str(lint_imports), str(repo / "pyproject.toml"), "--no-cache"], cwd=repo,
                           env={**os.environ, "PYTHONPATH": str(repo)})


if __name__ == "__main__":
    sys.exit(main())
