#!/usr/bin/env bash
# Set up (scripts/setup.sh), quantize the shipped SmolLM2-135M and print its table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quantize_smollm2.py "$@"
