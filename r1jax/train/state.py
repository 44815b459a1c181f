"""Train state: the trained params, optimizer state, step, rng, the MoE correction biases
(updated by the balancing rule after each step, never seen by the optimizer), and with LoRA the
frozen base model.

Full fine-tuning: `params` is the model tree (without the correction biases). LoRA: `params` is
the adapter tree (r1jax.model.lora) and `base` the frozen model; only the adapters reach the
gradient, the optimizer and the checkpoints, and the model the loss sees is
merge(base, adapters). The base doubles as GRPO's reference policy (no second copy).
"""

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
  params: Any  # the model tree, or the LoRA adapters
  opt_state: Any
  router_bias: dict  # "moe_layers/moe/router_bias" -> [L, E]
  rng: jax.Array  # uint32[2]
  base: Any = None  # LoRA: the frozen model tree (without correction biases); else None
  lora: Any = flax.struct.field(pytree_node=False, default=None)  # a lora.LoraConfig or None


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


def create(params, tx, seed: int, *, adapters=None, lora_cfg=None) -> TrainState:
  """A fresh state over the model `params`; with `adapters` (and their `lora_cfg`) the params
  become the frozen base and the adapters are what is trained."""
  model, bias = split_router_bias(params)
  trainable, base = (model, None) if adapters is None else (adapters, model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                    router_bias=bias, rng=jax.random.PRNGKey(seed), base=base, lora=lora_cfg)


def model_params(state: TrainState, trainable=None):
  """The model's parameter tree for `trainable` (default: the state's own), with the
  correction biases merged in (and the LoRA adapters merged into the base)."""
  trainable = state.params if trainable is None else trainable
  if state.base is not None:
    from r1jax.model import lora
    trainable = lora.merge(state.base, trainable, state.lora)
  return merge_router_bias(trainable, state.router_bias)


def full_params(state: TrainState):
  """The model's parameter tree (trainable params with the correction biases merged in)."""
  return model_params(state)


def reference_params(state: TrainState):
  """LoRA: the frozen base (with the current correction biases), the reference policy."""
  assert state.base is not None
  return merge_router_bias(state.base, state.router_bias)


def without_base(state: TrainState) -> TrainState:
  """What a checkpoint holds: the base is frozen and restored from where it came from."""
  return state.replace(base=None) if state.base is not None else state
