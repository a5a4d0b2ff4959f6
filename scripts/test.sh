#!/usr/bin/env bash
# Set up (scripts/setup.sh), then: lint (ruff), the layering contract (scripts/check_layers.py),
# and the whole test suite (arguments go to pytest: `scripts/test.sh -m "not model and not slow"`
# is the fast tier). Stops at the first step that fails. pytest runs in a worker per core, at most
# 4 (pytest-xdist; `-n 0` after it: one process), each taking a whole test module at a time, in
# the order tests/conftest.py gives them (the longest first); conftest also shares the cores out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check ." >&2
.venv/bin/ruff check .
echo "== python scripts/check_layers.py" >&2
.venv/bin/python scripts/check_layers.py
echo "== pytest $*" >&2
exec .venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder "$@"
