#!/usr/bin/env bash
# The test command: a virtual environment with gpt2jax[dev,reference], then pytest.
#   bash scripts/test.sh [pytest args]
# VENV (default .venv) is created when missing and reused after. TORCH_SPEC picks the torch
# build for the reference tests; torch==2.13.0 is the CPU wheel on the project's machines
# (elsewhere a plain `pip install torch` may pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[dev,reference]"
exec "$VENV/bin/python" -m pytest "$@"
