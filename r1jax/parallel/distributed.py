"""Multi-host start: `jax.distributed.initialize` from explicit flags or a detected cluster.

Explicit: --coordinator HOST:PORT --num_processes N --process_id I. Detected: SLURM with more
than one task, a multi-host Cloud TPU slice (GKE: the worker list in TPU_WORKER_HOSTNAMES or
TPU_PROCESS_ADDRESSES; a TPU VM: the VM metadata), Open MPI, or JAX_COORDINATOR_ADDRESS set; JAX
then reads the addresses from the environment or the metadata. A process that dies is noticed by
the others through the coordination service's heartbeat (R1JAX_HEARTBEAT_TIMEOUT seconds,
default 100), which ends them with an error instead of a hang.
"""

from __future__ import annotations

import os
import urllib.request

from r1jax.errors import UserError

# JAX's own GCE metadata address (jax._src.clusters.cloud_tpu_cluster)
_METADATA = "http://{host}/computeMetadata/v1/instance/attributes/{key}"


def gce_metadata(key: str, env=os.environ, timeout: float = 10.0) -> str | None:
  """A GCE VM metadata attribute (None if unset or unreachable)."""
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(_METADATA.format(host=host, key=key),
                                   headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.read().decode()
  except OSError:  # URLError, HTTPError (404: not set), timeouts
    return None


def cluster_detected(env=os.environ, metadata=gce_metadata) -> bool:
  """Whether this process is one of several a cluster started (call after importing jax).

  A Cloud TPU VM shows that it belongs to a multi-host slice only in its metadata; it is asked
  only where TPU_SKIP_MDS_QUERY is unset, which JAX sets at import on a host without TPU chips
  (as its own cluster detection does), so other machines make no network call.
  """
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  if "," in env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES", "")):
    return True  # a multi-host TPU slice on GKE
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "TPU_SKIP_MDS_QUERY" not in env:  # a TPU host: a multi-host TPU VM slice lists its workers
    return "," in (metadata("worker-network-endpoints", env) or "")
  return False


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
  connect_collectives(kw["initialization_timeout"])
  return True


def connect_collectives(timeout_s: int) -> None:
  """Open the processes' collective connections now, all together.

  CPU collectives (gloo) connect at the first collective and give up when a peer is not there
  within ~30 s: processes that reach their first collective at different times (one compiled a
  step from the persistent cache, the other from scratch, on a loaded host) would fail. So the
  processes first meet at a barrier of the coordination service (which waits `timeout_s`), then
  run one small collective over every device, which connects them."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the coordination client; no public API
  client = jax_distributed.global_state.client
  if client is not None:
    client.wait_at_barrier("r1jax_connect_collectives", timeout_s * 1000)
  multihost_utils.sync_global_devices("r1jax: collectives connected")
