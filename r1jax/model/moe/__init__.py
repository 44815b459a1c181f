"""Mixture of experts in one package, imported one way (routing, experts <- dispatch <- block):

  routing   top-k routers (DeepSeek sigmoid + groups + correction bias; softmax top-k with or
            without renormalisation), routing replay (R3), the Pallas router, the balance statistic
  experts   a device's routed experts, every local implementation (`cfg.moe_impl`), one SwiGLU
  dispatch  expert parallelism over the `expert` mesh axis in `jax.shard_map` (all-gather,
            all-to-all, ragged all-to-all)
  block     `moe_block`: route, run the experts (local or dispatched), add the shared experts
"""

from r1jax.model.moe.block import moe_block
from r1jax.model.moe.experts import (block_rows, capacity, experts_blocked, experts_capacity,
                                     experts_dense, experts_grouped, routed_experts)
from r1jax.model.moe.routing import route, route_pallas, route_replay, sequence_balance

__all__ = ["block_rows", "capacity", "experts_blocked", "experts_capacity", "experts_dense",
           "experts_grouped", "moe_block", "route", "route_pallas", "route_replay", "routed_experts",
           "sequence_balance"]
