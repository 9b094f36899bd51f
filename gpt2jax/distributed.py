"""Multi-process start-up through JAX's own runtime (`jax.distributed.initialize`)."""

from __future__ import annotations

import os

from gpt2jax.errors import UserError


def _cluster_detected() -> bool:
    """A multi-process launch that jax.distributed.initialize() can configure by itself."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    ompi_ranks = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1)
    return slurm_tasks > 1 or "," in tpu_hosts or ompi_ranks > 1


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run: explicit flags (all three), or auto-detected Slurm / TPU pod / Open MPI.

    Must run before anything touches a device. A single-process run does nothing here.
    """
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError("--coordinator-address, --num-processes and --process-id go together")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id} is not in [0, {num_processes})")
        import jax

        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif _cluster_detected():
        import jax

        jax.distributed.initialize()
