#!/usr/bin/env bash
# Multi-host training on a Cloud TPU pod slice: the same command on every worker; on TPU VMs
# jax.distributed.initialize() configures itself (gpt2jax detects TPU_WORKER_HOSTNAMES).
#   TPU=my-v4-32 ZONE=us-central2-b bash scripts/launch_tpu_pod.sh experiments/owt_gpt2_124m.py gs-fuse/runs/owt
set -euo pipefail
CONFIG=${1:?experiment file}
WORKDIR=${2:?run directory on storage every worker mounts}
gcloud compute tpus tpu-vm ssh "${TPU:?TPU name}" --zone "${ZONE:?zone}" --worker=all --command "
  cd ~/gpt2jax && pip install -q -e . 'jax[tpu]' &&
  gpt2jax train --config $CONFIG --workdir $WORKDIR --config.data.cache_dir=\${DATA_CACHE:-\$HOME/data_cache}"
