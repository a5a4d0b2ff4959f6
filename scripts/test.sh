#!/usr/bin/env bash
# Set up (scripts/setup.sh), then: lint (ruff), the layering contract (scripts/check_layers.py),
# and the whole test suite (arguments go to pytest: `scripts/test.sh -m "not model and not slow"`
# is the fast tier). Stops at the first step that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check ." >&2
.venv/bin/ruff check .
echo "== python scripts/check_layers.py" >&2
.venv/bin/python scripts/check_layers.py
echo "== pytest $*" >&2
exec .venv/bin/python -m pytest "$@"
