"""Train state: params, optimizer state, step, rng, and the MoE correction biases, which are
updated by the balancing rule after each step and never seen by the optimizer."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

BIAS_LEAF = "router_bias"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  router_bias: dict  # "moe_layers/moe/router_bias" -> [L, E]
  rng: jax.Array  # uint32[2]


def split_router_bias(params):
  """(params without correction biases, {path: bias})."""
  flat = traverse_util.flatten_dict(params, sep="/")
  bias = {k: v for k, v in flat.items() if k.endswith(BIAS_LEAF)}
  rest = {k: v for k, v in flat.items() if not k.endswith(BIAS_LEAF)}
  return traverse_util.unflatten_dict(rest, sep="/"), bias


def merge_router_bias(params, bias):
  if not bias:
    return params
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update(bias)
  return traverse_util.unflatten_dict(flat, sep="/")


def create(params, tx, seed: int) -> TrainState:
  trainable, bias = split_router_bias(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                    router_bias=bias, rng=jax.random.PRNGKey(seed))


def full_params(state: TrainState):
  """The model's parameter tree (trainable params with the correction biases merged in)."""
  return merge_router_bias(state.params, state.router_bias)
