#!/usr/bin/env bash
# Two processes on this machine forming one JAX cluster over 127.0.0.1 (CPU devices): the explicit
# form of a multi-host launch, and how multi-host runs are tested without a cluster.
#   bash scripts/launch_local_2proc.sh experiments/smoke.py runs/smoke_2proc
set -euo pipefail
CONFIG=${1:?experiment file}
WORKDIR=${2:?run directory}
PORT=${PORT:-12355}
export XLA_FLAGS="--xla_force_host_platform_device_count=4" JAX_PLATFORMS=cpu
for i in 0 1; do
  gpt2jax train --config "$CONFIG" --workdir "$WORKDIR" --no-progress \
    --coordinator-address "127.0.0.1:$PORT" --num-processes 2 --process-id "$i" &
done
wait
