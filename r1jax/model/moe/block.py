"""The MoE block: route every token, run its experts (locally, or across the `expert` mesh axis
through `dispatch`), add the shared experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model.moe import dispatch as dispatch_lib
from r1jax.model.moe.experts import routed_experts
from r1jax.model.moe.routing import route, route_pallas, route_replay, sequence_balance


def moe_block(p, x_BTD, cfg: ModelConfig, token_mask=None, replay_ids=None):
  """Routed + shared experts. Returns [B, T, D] and stats {counts [E], balance, dropped,
  rounds (expert exchanges run one after another: 1 but where a dropless exchange's routing
  overflowed its fast buffers, `dispatch._dropless`),
  ids [B, T, k] (the chosen experts; E for padding)}. Tokens where token_mask [B, T] is False
  go to no routed expert (padding). replay_ids [B, T, k]: use these experts (R3,
  `route_replay`) instead of the router's top-k."""
  dtype = cfg.jnp_dtype
  B, T, D = x_BTD.shape
  x = x_BTD.reshape(B * T, D)
  logits = jnp.dot(x.astype(jnp.float32), p["router"].astype(jnp.float32))
  if replay_ids is not None:
    weights, ids, scores = route_replay(logits, replay_ids.reshape(B * T, -1), cfg)
  else:
    router = route_pallas if cfg.router_impl == "pallas" else route
    weights, ids, scores = router(logits, p["router_bias"], cfg)
  if token_mask is not None:
    live = token_mask.reshape(-1, 1)
    ids = jnp.where(live, ids, cfg.n_routed_experts)  # id E: no expert, no capacity, no count
    weights = jnp.where(live, weights, 0.0)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    y, dropped, rounds = dispatch_lib.dispatch(p, x, weights, ids, cfg, mesh)
  else:
    (y, dropped), rounds = routed_experts(p, x, weights, ids, cfg), jnp.ones((), jnp.float32)
  y = y.astype(dtype).reshape(B, T, D)
  if "shared" in p:
    y = y + L.swiglu_mlp(p["shared"], x_BTD, dtype, cfg.fp8)
  stats = {"counts": jnp.bincount(ids.reshape(-1), length=cfg.n_routed_experts
                                  ).astype(jnp.float32),
           "balance": sequence_balance(scores.reshape(B, T, -1),
                                       ids.reshape(B, T, -1), cfg),
           "dropped": dropped, "rounds": rounds, "ids": ids.reshape(B, T, -1)}
  return y, stats
