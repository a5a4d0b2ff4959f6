#!/usr/bin/env bash
# Set up (scripts/setup.sh), then: lint (ruff), the layering contract (scripts/check_layers.py),
# and the whole test suite in two processes (arguments go to pytest: `scripts/test.sh -m "not model
# and not slow"` is the fast tier). Stops at the first step that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check ." >&2
.venv/bin/ruff check .
echo "== python scripts/check_layers.py" >&2
.venv/bin/python scripts/check_layers.py
# Two workers (pytest-xdist): most of the suite's time is compiles, one Python thread each, so two
# at once use both cores; worksteal keeps both busy to the end (the slowest tests come last).
echo "== pytest -n 2 --dist worksteal $*" >&2
exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@"
