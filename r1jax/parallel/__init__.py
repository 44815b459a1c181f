"""Mesh, logical sharding rules, expert-parallel dispatch, multi-host start and AOT memory."""

from r1jax.parallel.mesh import AXES, BATCH_AXES, abstract_mesh, batch_axes, make_mesh
from r1jax.parallel.rules import (RULES, batch_sharding, init_sharded, param_shardings,
                                  param_specs, shard_batch, shard_params, spec_for)

__all__ = ["AXES", "BATCH_AXES", "abstract_mesh", "batch_axes", "make_mesh", "RULES",
           "batch_sharding", "init_sharded", "param_shardings", "param_specs", "shard_batch",
           "shard_params", "spec_for"]
