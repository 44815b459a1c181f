"""Mesh, logical sharding rules, expert-parallel dispatch, multi-host start and AOT memory."""

from r1jax.parallel.mesh import (AXES, BATCH_AXES, abstract_mesh, batch_axes, context_size,
                                 make_mesh, position_multiple, split_devices)
from r1jax.parallel.rules import (RULES, abstract_params, batch_devices, batch_sharding,
                                  global_batch,
                                  init_sharded, param_shardings, param_specs, shard_batch,
                                  shard_params, spec_for, to_host)

__all__ = ["AXES", "BATCH_AXES", "abstract_mesh", "batch_axes", "context_size", "make_mesh",
           "position_multiple", "split_devices", "RULES",
           "abstract_params", "batch_devices", "batch_sharding", "global_batch", "init_sharded", "param_shardings",
           "param_specs", "shard_batch", "shard_params", "spec_for", "to_host"]
