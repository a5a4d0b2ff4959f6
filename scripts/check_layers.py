"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

import-linter reads the package from the file system, and qcompile's installed layout
(`qcompile.passes`, `qcompile.kernels`, `qcompile.backends`) is not the repository's
(`passes/`, `kernels/`, `backends/` at the top, mapped by pyproject's package-dir). So this
script lays the installed layout out in a temporary folder of symbolic links to the
repository's files and runs `lint-imports` there. Exit status: lint-imports' own (0: kept).

    python scripts/check_layers.py [--repo DIR]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the repository root (default: this script's)")
    args = parser.parse_args(argv)
    lint_imports = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="qcompile-layers-") as tmp:
        installed_layout(args.repo, Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        # run from the folder: lint-imports puts its working directory first on sys.path
        return subprocess.call([str(lint_imports), str(args.repo / "pyproject.toml"), "--no-cache"],
                               cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
