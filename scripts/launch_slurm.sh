#!/usr/bin/env bash
# Multi-host GPU training on Slurm: one process per node, each driving that node's GPUs with pmap.
# jax.distributed.initialize() reads the coordinator, process count and index from Slurm's
# environment (SLURM_NTASKS > 1 is detected by gpt2jax), so no flags are needed.
#   sbatch scripts/launch_slurm.sh experiments/owt_gpt2_124m.py runs/owt_gpt2_124m
#SBATCH --job-name=gpt2jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=96:00:00
set -euo pipefail
CONFIG=${1:?experiment file}
WORKDIR=${2:?run directory (on a shared filesystem)}
shift 2
# Every process must see the same run directory and data cache (shared filesystem).
srun --kill-on-bad-exit=1 gpt2jax train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.data.cache_dir="${DATA_CACHE:-$PWD/data_cache}" "$@"
