"""Starting JAX's multi-process runtime: explicit flags, or auto-detection on TPU pods and SLURM."""

from __future__ import annotations

import os

import jax

from dit.errors import UserError


def _cluster_detected() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return slurm or tpu_pod


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Calls jax.distributed.initialize once: with the given flags, or bare where JAX can detect the cluster."""
    flags = (coordinator, num_processes, process_id)
    if any(f is not None for f in flags):
        if any(f is None for f in flags):
            raise UserError(
                "multi-process runs need all three of --coordinator HOST:PORT, --num-processes N and "
                "--process-id I (or none of them, to auto-detect on TPU pods and SLURM)."
            )
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id} must lie in [0, {num_processes}).")
        # CPU devices (tests, laptops) need a collectives backend to talk across processes; GPUs and
        # TPUs ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process has called this with the same `name` (once per name), through the
    coordination service rather than a collective: processes that finish compiling minutes apart then
    meet here, where gloo (the CPU collectives) would give up connecting after about 30 seconds."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def from_process_zero(value: int) -> int:
    """Process 0's `value` on every process (a collective when there are several): where process 0 decides
    (it reads files the others may see differently, or draws a number) and all must act alike."""
    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
