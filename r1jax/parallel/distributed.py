"""Multi-host start: `jax.distributed.initialize` from explicit flags or a detected cluster.

Explicit: --coordinator HOST:PORT --num_processes N --process_id I. Detected: SLURM with more
than one task, a multi-host Cloud TPU slice, Open MPI, or JAX_COORDINATOR_ADDRESS set; JAX then
reads the addresses from the environment. A process that dies is noticed by the others through
the coordination service's heartbeat (R1JAX_HEARTBEAT_TIMEOUT seconds, default 100), which ends
them with an error instead of a hang.
"""

from __future__ import annotations

import os

from r1jax.errors import UserError


def cluster_detected(env=os.environ) -> bool:
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Start the multi-process runtime if asked or detected; True if it was started."""
  import jax
  explicit = [coordinator is not None, num_processes is not None, process_id is not None]
  if any(explicit) and not all(explicit):
    raise UserError("--coordinator, --num_processes and --process_id go together")
  if not all(explicit) and not cluster_detected():
    return False
  heartbeat = int(os.environ.get("R1JAX_HEARTBEAT_TIMEOUT", "100"))
  kw = dict(heartbeat_timeout_seconds=heartbeat,
            initialization_timeout=int(os.environ.get("R1JAX_INIT_TIMEOUT", "300")),
            shutdown_timeout_seconds=int(os.environ.get("R1JAX_SHUTDOWN_TIMEOUT", "600")))
  if all(explicit):
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator, num_processes, process_id, **kw)
  else:
    jax.distributed.initialize(**kw)
  return True
