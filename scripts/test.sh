#!/usr/bin/env bash
# Set up (scripts/setup.sh), then: lint (ruff), the layering contract (scripts/check_layers.py),
# and the whole test suite (arguments go to pytest: `scripts/test.sh -m "not model and not slow"`
# is the fast tier). Stops at the first step that fails. Two pytest workers (pytest-xdist; Q4_TEST_WORKERS
# to change it): compiling is mostly one thread of Python, so two halve the suite's time on two cores;
# tests/conftest.py gives each worker its share of the cores and keeps tests that share work together.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check ." >&2
.venv/bin/ruff check .
echo "== python scripts/check_layers.py" >&2
.venv/bin/python scripts/check_layers.py
workers=(-n "${Q4_TEST_WORKERS:-2}" --dist loadgroup)
echo "== pytest ${workers[*]} $*" >&2
exec .venv/bin/python -m pytest "${workers[@]}" "$@"
