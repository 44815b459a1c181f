"""Fused MoE router: scores, correction bias, group-limited top-k, gate weights, dispatch order.

  weights, expert_ids, sort_idx, group_sizes = route(logits, bias, top_k=8, n_group=8,
      topk_group=4, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
      group_fill="neg_inf")

  logits [T, E] (fp32 router logits), bias [E] or None (e_score_correction_bias)
  -> weights [T, k] f32, expert_ids [T, k] int32 (in descending selection score),
     sort_idx [T*k] int32 (stable argsort of expert_ids.ravel(): the dispatch permutation),
     group_sizes [E] int32 (assignments per expert).

Semantics (REFERENCE.md section 2, HF DeepseekV3 "noaux_tc"): scores = sigmoid(logits) or
softmax(logits); selection = scores + bias (selection only); group score = sum of the top-2
selection scores per group (sigmoid) or their max (softmax, V2 style); the topk_group best
groups are kept and the other experts' selection scores are replaced by `group_fill`: "neg_inf"
(DeepSeek's own code: they are never chosen) or "zero" (the masked_fill(.., 0.0) of transformers'
DeepseekV2, and of its DeepseekV3 before huggingface/transformers#45441: it chooses them over
kept experts whose biased score is negative); the top_k experts by that score are chosen, ties
to the lowest index as jax.lax.top_k does; weights are the unbiased scores, divided by
(sum + 1e-20) if norm_topk_prob, times routed_scaling_factor.

The Pallas kernel fuses everything per block of `tt` tokens (top-k as k rounds of argmax, group
scores with per-group masks, so no in-kernel reshapes). The sort and the per-expert counts run
after it in XLA (argsort / bincount), which is the better tool for a global sort. Tested in
interpret mode on CPU only; the generic pallas_call (no TPU-specific features) is meant to lower
on Mosaic TPU and on GPU too, but has not been compiled anywhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as C

# selection score of the experts in dropped groups
GROUP_FILLS = {"neg_inf": float("-inf"), "zero": 0.0}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  tt: int = 256  # tokens per grid step

  @classmethod
  def default(cls, backend: str | None = None) -> "BlockSizes":
    del backend  # a [tt, E] fp32 block is small on every backend
    return cls()


def _check(logits, bias, top_k, n_group, topk_group, scoring_func, group_fill):
  if logits.ndim != 2:
    raise ValueError(f"router logits must be [T, E]; got {logits.shape}")
  num_experts = logits.shape[1]
  if bias is not None and bias.shape != (num_experts,):
    raise ValueError(f"bias must be [{num_experts}]; got {bias.shape}")
  if scoring_func not in ("sigmoid", "softmax"):
    raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax'; got {scoring_func!r}")
  if group_fill not in GROUP_FILLS:
    raise ValueError(f"group_fill must be one of {tuple(GROUP_FILLS)}; got {group_fill!r}")
  if num_experts % n_group:
    raise ValueError(f"n_group={n_group} must divide the {num_experts} experts")
  if not 1 <= topk_group <= n_group:
    raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
  if scoring_func == "sigmoid" and num_experts // n_group < 2:
    raise ValueError("sigmoid routing scores groups by their top-2 experts: need >= 2 experts "
                     f"per group, got {num_experts} experts in {n_group} groups")
  if not 1 <= top_k <= topk_group * (num_experts // n_group):
    raise ValueError(f"top_k={top_k} exceeds the experts of {topk_group} groups")


def _scores(logits, scoring_func):
  logits = logits.astype(jnp.float32)
  if scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def _finish_weights(weights_TK, norm_topk_prob, routed_scaling_factor):
  if norm_topk_prob:
    weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
  return weights_TK * routed_scaling_factor


def _gate_weights(logits, expert_ids, scoring_func, norm_topk_prob, routed_scaling_factor):
  """Weights [T, k] of the chosen experts as a function of the logits (selection held fixed)."""
  weights_TK = jnp.take_along_axis(_scores(logits, scoring_func), expert_ids, axis=1)
  return _finish_weights(weights_TK, norm_topk_prob, routed_scaling_factor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _with_weight_grad(logits, expert_ids, kernel_weights, static):
  """kernel_weights, differentiable in the logits: the selection is piecewise constant, so the
  gradient is that of `_gate_weights` at fixed expert ids (a [T, k] gather, recomputed in XLA)."""
  del logits, expert_ids, static
  return kernel_weights


def _with_weight_grad_fwd(logits, expert_ids, kernel_weights, static):
  return kernel_weights, (logits, expert_ids)


def _with_weight_grad_bwd(static, res, dweights):
  logits, expert_ids = res
  _, vjp = jax.vjp(lambda l: _gate_weights(l, expert_ids, *static), logits)
  return vjp(dweights)[0], None, None


_with_weight_grad.defvjp(_with_weight_grad_fwd, _with_weight_grad_bwd)


def _argmax_lowest(x_TE, col_TE, num_experts):
  """Row max and the lowest column attaining it (jax.lax.top_k's tie order)."""
  best = jnp.max(x_TE, axis=1, keepdims=True)
  idx = jnp.min(jnp.where(x_TE == best, col_TE, num_experts), axis=1, keepdims=True)
  return best, idx


def _router_kernel(logits_ref, bias_ref, weights_ref, ids_ref, *, top_k, n_group, topk_group,
                   scoring_func, group_fill, norm_topk_prob, routed_scaling_factor):
  scores_TE = _scores(logits_ref[...], scoring_func)
  select_TE = scores_TE + bias_ref[...]
  tt, num_experts = select_TE.shape
  col_TE = jax.lax.broadcasted_iota(jnp.int32, (tt, num_experts), 1)
  group_TE = col_TE // (num_experts // n_group)
  neg_inf = jnp.float32(-jnp.inf)

  # Group scores, one [tt, 1] column per group.
  group_scores = []
  for g in range(n_group):
    in_g = jnp.where(group_TE == g, select_TE, neg_inf)
    top1, idx1 = _argmax_lowest(in_g, col_TE, num_experts)
    if scoring_func == "sigmoid":
      top2 = jnp.max(jnp.where(col_TE == idx1, neg_inf, in_g), axis=1, keepdims=True)
      group_scores.append(top1 + top2)
    else:
      group_scores.append(top1)

  # Keep the topk_group best groups (ties: lowest group index, like top_k).
  keep_TE = jnp.zeros((tt, num_experts), jnp.bool_)
  taken = [jnp.zeros((tt, 1), jnp.bool_) for _ in range(n_group)]
  for _ in range(topk_group):
    best, best_g = jnp.full((tt, 1), neg_inf), jnp.full((tt, 1), n_group, jnp.int32)
    for g in range(n_group):  # strict > keeps the lowest index among equals
      better = ~taken[g] & (group_scores[g] > best)
      best, best_g = jnp.where(better, group_scores[g], best), jnp.where(better, g, best_g)
    taken = [t | (best_g == g) for g, t in enumerate(taken)]
    keep_TE = keep_TE | (group_TE == best_g)
  masked_TE = jnp.where(keep_TE, select_TE, GROUP_FILLS[group_fill])

  # Top-k experts by k rounds of argmax; the chosen entry drops to -inf for the next round.
  weights, ids = [], []
  for _ in range(top_k):
    _, idx = _argmax_lowest(masked_TE, col_TE, num_experts)
    chosen_TE = col_TE == idx
    weights.append(jnp.sum(jnp.where(chosen_TE, scores_TE, 0.0), axis=1, keepdims=True))
    ids.append(idx)
    masked_TE = jnp.where(chosen_TE, neg_inf, masked_TE)
  weights_TK = jnp.concatenate(weights, axis=1)
  weights_ref[...] = _finish_weights(weights_TK, norm_topk_prob, routed_scaling_factor)
  ids_ref[...] = jnp.concatenate(ids, axis=1)


def _dispatch(expert_ids_TK, num_experts):
  flat = expert_ids_TK.reshape(-1)
  sort_idx = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return sort_idx, group_sizes


@functools.partial(jax.jit, static_argnames=(
    "top_k", "n_group", "topk_group", "scoring_func", "group_fill", "norm_topk_prob",
    "routed_scaling_factor", "block_sizes", "interpret"))
def _route(logits, bias, *, top_k, n_group, topk_group, scoring_func, group_fill, norm_topk_prob,
           routed_scaling_factor, block_sizes, interpret):
  t, num_experts = logits.shape
  tt = C.fit_tile(block_sizes.tt, t, 8)
  t_pad = C.round_up(t, tt)
  kernel = functools.partial(
      _router_kernel, top_k=top_k, n_group=n_group, topk_group=topk_group,
      scoring_func=scoring_func, group_fill=group_fill, norm_topk_prob=norm_topk_prob,
      routed_scaling_factor=routed_scaling_factor)
  weights, ids = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((t_pad, top_k), jnp.float32),
                 jax.ShapeDtypeStruct((t_pad, top_k), jnp.int32)),
      grid=(t_pad // tt,),
      in_specs=[pl.BlockSpec((tt, num_experts), lambda i: (i, 0)),
                pl.BlockSpec((1, num_experts), lambda i: (0, 0))],
      out_specs=(pl.BlockSpec((tt, top_k), lambda i: (i, 0)),
                 pl.BlockSpec((tt, top_k), lambda i: (i, 0))),
      interpret=interpret,
  )(C.pad_axis(logits.astype(jnp.float32), 0, t_pad), bias.astype(jnp.float32)[None])
  weights, ids = weights[:t], ids[:t]
  return (weights, ids, *_dispatch(ids, num_experts))


def route(logits, bias=None, *, top_k: int, n_group: int = 1, topk_group: int = 1,
          scoring_func: str = "sigmoid", norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0, group_fill: str = "neg_inf",
          block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Router kernel; see the module docstring for shapes and semantics.

  Differentiable in `logits` through the weights (as route_reference is); not in `bias`, which
  steers the selection only.
  """
  _check(logits, bias, top_k, n_group, topk_group, scoring_func, group_fill)
  if bias is None:
    bias = jnp.zeros((logits.shape[1],), jnp.float32)
  weights, expert_ids, sort_idx, group_sizes = _route(
      jax.lax.stop_gradient(logits), jax.lax.stop_gradient(bias), top_k=top_k, n_group=n_group,
      topk_group=topk_group, scoring_func=scoring_func, group_fill=group_fill,
      norm_topk_prob=norm_topk_prob, routed_scaling_factor=float(routed_scaling_factor),
      block_sizes=block_sizes or BlockSizes.default(), interpret=C.resolve_interpret(interpret))
  static = (scoring_func, norm_topk_prob, float(routed_scaling_factor))
  weights = _with_weight_grad(logits, expert_ids, weights, static)
  return weights, expert_ids, sort_idx, group_sizes


def route_reference(logits, bias=None, *, top_k: int, n_group: int = 1, topk_group: int = 1,
                    scoring_func: str = "sigmoid", norm_topk_prob: bool = True,
                    routed_scaling_factor: float = 1.0, group_fill: str = "neg_inf"):
  """Plain-jnp router, written the way HF's DeepseekV3 MoEGate reads (reshape + top_k)."""
  _check(logits, bias, top_k, n_group, topk_group, scoring_func, group_fill)
  t, num_experts = logits.shape
  scores_TE = _scores(logits, scoring_func)
  select_TE = scores_TE if bias is None else scores_TE + bias.astype(jnp.float32)
  select_TGX = select_TE.reshape(t, n_group, num_experts // n_group)
  if scoring_func == "sigmoid":
    group_scores_TG = jax.lax.top_k(select_TGX, 2)[0].sum(-1)
  else:
    group_scores_TG = select_TGX.max(-1)
  _, top_groups = jax.lax.top_k(group_scores_TG, topk_group)
  keep_TG = jnp.zeros((t, n_group), jnp.bool_).at[jnp.arange(t)[:, None], top_groups].set(True)
  keep_TE = jnp.repeat(keep_TG, num_experts // n_group, axis=1)
  _, expert_ids = jax.lax.top_k(jnp.where(keep_TE, select_TE, GROUP_FILLS[group_fill]), top_k)
  expert_ids = expert_ids.astype(jnp.int32)
  weights = _gate_weights(logits, expert_ids, scoring_func, norm_topk_prob, routed_scaling_factor)
  return (weights, expert_ids, *_dispatch(expert_ids, num_experts))
