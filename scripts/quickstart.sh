#!/usr/bin/env bash
# The quick start: a virtual environment, the package, a small byte-level GPT-2 trained on this
# Python's own standard library (~4 minutes on a 2-core CPU), and samples from its checkpoint.
#   bash scripts/quickstart.sh            # RUN=runs/pystdlib_char by default
#   TRAIN_ARGS="--config.train.max_steps=4" bash scripts/quickstart.sh   # extra train arguments (the tests)
# On a machine with an NVIDIA GPU, install jax[cuda12] into the venv first (see README): the same
# command then trains on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUN=${RUN:-runs/pystdlib_char}

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# setuptools reports every editable install with a warning meant for packagers: not for this first run
PYTHONWARNINGS=ignore::UserWarning "$VENV/bin/python" -m pip install -q -e .
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
"$VENV/bin/gpt2jax" train --config experiments/pystdlib_char.py --workdir "$RUN" ${TRAIN_ARGS:-}
echo
echo "== samples from $RUN (latest checkpoint) =="
"$VENV/bin/gpt2jax" sample --run "$RUN" --prompt "def " --max-new-tokens 120 --temperature 0.8 --num-samples 2
echo
echo "TensorBoard logs: $RUN/tb   (view with: tensorboard --logdir $(dirname "$RUN"))"
