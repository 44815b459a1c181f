"""One declaration of every parameter: shape, dtype, logical axes and initializer.

`declare(cfg)` returns a pytree of `ParamSpec` leaves; initialization (`init`), abstract shapes
(`abstract`) and logical axes (`logical_axes`, mapped to mesh axes by `r1jax.parallel`) all derive
from it. Weights are stored [in, out] (HF stores [out, in]); attention projections keep the head
axis separate so it can be sharded.

MoE tree (DeepSeek: MLA attention; Qwen3-MoE: the dense tree's GQA attention), dense tree:
  embed       [V, D]        embed [V, D]
  dense_layers{...} [Ld,…]  layers{attn_norm, attn{q,k,v,(q_bias,k_bias,v_bias),
                                   (q_norm,k_norm: Qwen3),o}, mlp_norm, mlp}
  moe_layers{...}   [Lm,…]  final_norm [D]
  final_norm  [D]           lm_head [D, V]   (absent when tie_word_embeddings)
  lm_head     [D, V]
  mtp{enorm, hnorm, eh_proj [2D, D], layer{...}, norm} stacked over num_nextn_predict_layers

A sequence classifier (cfg.num_labels > 0) has `score` [D, num_labels] in place of lm_head
(tied or not: the embedding stays) and no MTP modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from r1jax.model import families
from r1jax.model.config import ModelConfig
from r1jax.model.spec import INIT_STD, ParamSpec, is_spec as _is_spec, norm as _norm  # noqa: F401



def _stack(tree, n: int, axis_name: str = "layers"):
  return jax.tree.map(lambda s: dataclasses.replace(s, shape=(n, *s.shape),
                                                    axes=(axis_name, *s.axes)),
                      tree, is_leaf=_is_spec)


def _mlp(cfg: ModelConfig, width: int) -> dict:
  D = cfg.hidden_size
  return {"gate": ParamSpec((D, width), ("embed", "mlp")),
          "up": ParamSpec((D, width), ("embed", "mlp")),
          "down": ParamSpec((width, D), ("mlp", "embed"))}


def _moe(cfg: ModelConfig) -> dict:
  D, E, I = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
  p = {
      # router weight and correction bias stay fp32 whatever param_dtype is (recipe + HF)
      "router": ParamSpec((D, E), ("embed", None), dtype=jnp.float32),
      "router_bias": ParamSpec((E,), (None,), "zeros", dtype=jnp.float32),
      "gate": ParamSpec((E, D, I), ("exp", "embed", "moe_mlp")),
      "up": ParamSpec((E, D, I), ("exp", "embed", "moe_mlp")),
      "down": ParamSpec((E, I, D), ("exp", "moe_mlp", "embed")),
  }
  if cfg.n_shared_experts:
    p["shared"] = _mlp(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size)
  return p


def _layer(cfg: ModelConfig, moe: bool) -> dict:
  """One decoder layer: the family's attention, then a dense MLP or the MoE."""
  D = cfg.hidden_size
  attn = families.ATTENTION[cfg.attention].declare(cfg)
  return {"attn_norm": _norm(D), "attn": attn, "mlp_norm": _norm(D),
          ("moe" if moe else "mlp"): _moe(cfg) if moe else _mlp(cfg, cfg.intermediate_size)}


def mtp_layer_is_moe(cfg: ModelConfig, depth: int) -> bool:
  """The hub stores MTP module k as layer num_hidden_layers + k; its FFN kind follows that index."""
  return cfg.num_hidden_layers + depth >= cfg.first_k_dense_replace


def declare(cfg: ModelConfig) -> dict:
  """The parameter tree of `cfg` as ParamSpec leaves."""
  D, V = cfg.hidden_size, cfg.vocab_size
  tree: dict = {"embed": ParamSpec((V, D), ("vocab", "embed"))}
  if cfg.is_moe:
    if cfg.num_dense_layers:
      tree["dense_layers"] = _stack(_layer(cfg, False), cfg.num_dense_layers)
    if cfg.num_moe_layers:
      tree["moe_layers"] = _stack(_layer(cfg, True), cfg.num_moe_layers)
    if cfg.num_nextn_predict_layers:
      assert all(mtp_layer_is_moe(cfg, k) == mtp_layer_is_moe(cfg, 0)
                 for k in range(cfg.num_nextn_predict_layers)), "mixed MTP layer kinds"
      mtp = {"enorm": _norm(D), "hnorm": _norm(D),
             "eh_proj": ParamSpec((2 * D, D), ("mtp_in", "embed")),
             "layer": _layer(cfg, mtp_layer_is_moe(cfg, 0)), "norm": _norm(D)}
      tree["mtp"] = _stack(mtp, cfg.num_nextn_predict_layers)
  else:
    tree["layers"] = _stack(_layer(cfg, False), cfg.num_hidden_layers)
  tree["final_norm"] = _norm(D)
  if cfg.num_labels:  # HF *ForSequenceClassification's bias-free `score`
    tree["score"] = ParamSpec((D, cfg.num_labels), ("embed", None))
  elif not cfg.tie_word_embeddings:
    tree["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
  return tree


def _dtype(cfg: ModelConfig, spec: ParamSpec):
  return jnp.dtype(spec.dtype) if spec.dtype is not None else cfg.jnp_param_dtype


def abstract(cfg: ModelConfig):
  """ShapeDtypeStructs of the parameter tree; allocates nothing."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, _dtype(cfg, s)), declare(cfg),
                      is_leaf=_is_spec)


def num_params(cfg: ModelConfig) -> int:
  """The number of parameters `declare` gives (MTP modules included)."""
  return sum(math.prod(s.shape) for s in jax.tree.leaves(declare(cfg), is_leaf=_is_spec))


def logical_axes(cfg: ModelConfig):
  """The logical axis names of every parameter, as a pytree of tuples."""
  return jax.tree.map(lambda s: s.axes, declare(cfg), is_leaf=_is_spec)


MAX_DRAW = 2**30  # elements per random draw (one draw compiles far faster than one per leaf)


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, rng: jax.Array):
  """Random parameters: normal(0.02) matrices, unit norms, zero biases.

  The normal leaves are cut from a few large draws (of at most MAX_DRAW elements) rather than one
  draw per leaf: XLA:CPU compiles each threefry draw separately, and one per leaf made init take
  ~30 s for the tiny model. Deterministic in `rng` and the declaration order.
  """
  leaves, treedef = jax.tree.flatten(declare(cfg), is_leaf=_is_spec)
  out: list = [None] * len(leaves)

  def draw(group, g):
    sizes = [math.prod(leaves[i].shape) for i in group]
    flat = jax.random.normal(jax.random.fold_in(rng, g), (sum(sizes),), jnp.float32)
    offset = 0
    for i, n in zip(group, sizes):
      out[i] = (INIT_STD * flat[offset:offset + n]).reshape(leaves[i].shape).astype(
          _dtype(cfg, leaves[i]))
      offset += n

  groups, size = [[]], 0
  for i, spec in enumerate(leaves):
    if spec.init != "normal":
      fill = jnp.ones if spec.init == "ones" else jnp.zeros
      out[i] = fill(spec.shape, _dtype(cfg, spec))
      continue
    n = math.prod(spec.shape)
    if groups[-1] and size + n > MAX_DRAW:
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += n
  for g, group in enumerate(groups):
    if group:
      draw(group, g)
  return jax.tree.unflatten(treedef, out)


def map_specs(fn: Callable[[ParamSpec], Any], cfg: ModelConfig):
  return jax.tree.map(fn, declare(cfg), is_leaf=_is_spec)
