"""The MoE block: route every token, run its experts (locally, or across the `expert` mesh axis
through `dispatch`), add the shared experts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from r1jax.axes import batch_axes
from r1jax.model.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model.moe import dispatch as dispatch_lib
from r1jax.model.moe.experts import routed_experts
from r1jax.model.moe.routing import route, route_pallas, route_replay, sequence_balance


def moe_block(p, x_BTD, cfg: ModelConfig, token_mask=None, replay_ids=None,
              positions_split: bool = False):
  """Routed + shared experts. Returns [B, T, D] and stats {counts [E], balance, dropped,
  rounds (expert exchanges run one after another: 1 but where a dropless exchange's routing
  overflowed its fast buffers, `dispatch._dropless`),
  ids [B, T, k] (the chosen experts; E for padding)}. Tokens where token_mask [B, T] is False
  go to no routed expert (padding). replay_ids [B, T, k]: use these experts (R3,
  `route_replay`) instead of the router's top-k. positions_split: x's positions are split over
  a `context` mesh axis (the training forward under context parallelism; `_token_order`)."""
  dtype = cfg.jnp_dtype
  B, T, D = x_BTD.shape
  order = _token_order(B, T) if positions_split else None
  x = _flatten(x_BTD, order)
  logits = jnp.dot(x.astype(jnp.float32), p["router"].astype(jnp.float32))
  if replay_ids is not None:
    weights, ids, scores = route_replay(logits, _flatten(replay_ids, order), cfg)
  else:
    router = route_pallas if cfg.router_impl == "pallas" else route
    weights, ids, scores = router(logits, p["router_bias"], cfg)
  if token_mask is not None:
    live = _flatten(token_mask, order)[:, None]
    ids = jnp.where(live, ids, cfg.n_routed_experts)  # id E: no expert, no capacity, no count
    weights = jnp.where(live, weights, 0.0)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    y, dropped, rounds = dispatch_lib.dispatch(p, x, weights, ids, cfg, mesh)
  else:
    (y, dropped), rounds = routed_experts(p, x, weights, ids, cfg), jnp.ones((), jnp.float32)
  y = _unflatten(y.astype(dtype), B, T, order)
  if "shared" in p:
    y = y + L.swiglu_mlp(p["shared"], x_BTD, dtype, cfg.fp8)
  ids_BTk = _unflatten(ids, B, T, order)
  stats = {"counts": jnp.bincount(ids.reshape(-1), length=cfg.n_routed_experts
                                  ).astype(jnp.float32),
           "balance": sequence_balance(_unflatten(scores, B, T, order), ids_BTk, cfg),
           "dropped": dropped, "rounds": rounds, "ids": ids_BTk}
  return y, stats


def _token_order(B: int, T: int):
  """(row shards, position shards) when a `context` mesh axis splits each row's T positions
  (context parallelism), else None.

  The routed experts take the tokens as one [B * T] axis split over the batch axes and
  `context` (`dispatch`). Where only the rows are split, [B, T] -> [B * T] keeps each device's
  tokens together. Where the positions are split too, a device holds a block of rows x a block
  of positions, which is not a contiguous run of B * T: `_flatten` orders the tokens by (row
  shard, position shard, row, position), so every device's tokens are again one run of the
  flat axis (the reorders are local; nothing moves between devices), and `_unflatten` undoes
  it. Routed experts treat every token on its own, so the order changes no value (with a
  capacity factor, it is the order in which assignments past capacity are dropped)."""
  shards = L.position_shards(T)
  if shards == 1:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  rows = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  return (rows if B % rows == 0 else 1), shards


def _flatten(a, order):
  """a [B, T, ...] -> [B * T, ...] in `_token_order`'s order."""
  B, T = a.shape[:2]
  if order is None:
    return a.reshape(B * T, *a.shape[2:])
  rows, shards = order
  a = a.reshape(rows, B // rows, shards, T // shards, *a.shape[2:])
  return jnp.swapaxes(a, 1, 2).reshape(B * T, *a.shape[4:])


def _unflatten(a, B: int, T: int, order):
  """The inverse of `_flatten`: [B * T, ...] -> [B, T, ...]."""
  if order is None:
    return a.reshape(B, T, *a.shape[1:])
  rows, shards = order
  a = a.reshape(rows, shards, B // rows, T // shards, *a.shape[1:])
  return jnp.swapaxes(a, 1, 2).reshape(B, T, *a.shape[4:])
