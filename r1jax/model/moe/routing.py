"""Routers: top-k expert choice and gate weights for every token.

- DeepSeek-V3: sigmoid scores, a correction bias that steers selection only (`noaux_tc`),
  group-limited top-k (`n_group`, `topk_group`), optional renormalisation, `routed_scaling_factor`.
- DeepSeek-V2 / Qwen3-MoE: softmax scores, top-k (group-limited greedy for V2), with or without
  renormalisation (`norm_topk_prob`).
`route_replay` reuses recorded expert ids (R3); `route_pallas` is the fused Pallas router
(`cfg.router_impl = "pallas"`); `sequence_balance` is DeepSeek-V3's sequence-wise balance
statistic. Both routers give the experts of dropped groups the selection score
`cfg.router_group_fill` (-inf as DeepSeek, or 0.0 as transformers' DeepseekV2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig


def _scores(logits_NE, cfg: ModelConfig):
  if cfg.scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits_NE)
  return jax.nn.softmax(logits_NE, axis=-1)


def route(logits_NE, bias_E, cfg: ModelConfig):
  """Top-k routing. Returns weights [N,k] fp32, expert ids [N,k] int32, scores [N,E] fp32."""
  N, E = logits_NE.shape
  G = cfg.n_group
  scores = _scores(logits_NE, cfg)
  # the correction bias steers selection only; gate weights come from the unbiased scores
  choice = scores + jax.lax.stop_gradient(bias_E) if cfg.topk_method == "noaux_tc" else scores
  if G > 1:
    grouped = choice.reshape(N, G, E // G)
    if cfg.topk_method == "noaux_tc":
      group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_score = grouped.max(-1)
    _, keep = jax.lax.top_k(group_score, cfg.topk_group)
    group_mask = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], keep].set(True)
    # Dropped groups' experts: -inf never wins (DeepSeek-V3's inference/model.py; transformers'
    # DeepseekV3 since huggingface/transformers#45441); 0.0 beats every kept expert whose
    # bias-corrected score went negative (transformers' DeepseekV3 before that fix). The softmax
    # "group_limited_greedy" path (V2) takes the same fill: DeepSeek-V2's modeling code and
    # transformers' DeepseekV2 fill 0.0, but softmax scores are > 0, so the fills differ only
    # on ties with scores that underflowed to exactly 0 (torch's top-k tie order is unspecified
    # there anyway; a dropped group's expert picked on such a tie weighs 0 in V2, its unmasked
    # score here).
    fill = -jnp.inf if cfg.router_group_fill == "neg_inf" else 0.0
    choice = jnp.where(jnp.repeat(group_mask, E // G, axis=1), choice, fill)
  _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, ids, axis=1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32), scores


def route_replay(logits_NE, ids_Nk, cfg: ModelConfig):
  """Routing replay (R3): the given experts ids [N, k] instead of a top-k; their gate weights
  come from the current router's scores (normalized and scaled as in `route`), so the router
  still gets its gradient through them. Returns (weights [N, k], ids [N, k], scores [N, E])."""
  scores = _scores(logits_NE, cfg)
  ids = ids_Nk.astype(jnp.int32)
  weights = jnp.take_along_axis(scores, jnp.minimum(ids, logits_NE.shape[1] - 1), axis=1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, ids, scores


def route_pallas(logits_NE, bias_E, cfg: ModelConfig):
  """`route` through the fused Pallas router; same outputs, differentiable in the logits."""
  from pallas_kernels import routing
  # the kernel scores groups by their top-2 experts iff sigmoid; `route` iff noaux_tc
  if cfg.n_group > 1 and (cfg.scoring_func == "sigmoid") != (cfg.topk_method == "noaux_tc"):
    raise ValueError(f"router_impl='pallas' supports group-limited routing with sigmoid+noaux_tc "
                     f"or softmax+greedy; got scoring_func={cfg.scoring_func!r}, "
                     f"topk_method={cfg.topk_method!r}")
  bias = jax.lax.stop_gradient(bias_E) if cfg.topk_method == "noaux_tc" else None
  weights, ids = routing.route(
      logits_NE, bias, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
      topk_group=cfg.topk_group, scoring_func=cfg.scoring_func,
      norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
      group_fill=cfg.router_group_fill)[:2]
  return weights, ids, _scores(logits_NE, cfg)


def sequence_balance(scores_BTE, ids_BTk, cfg: ModelConfig):
  """DeepSeek-V3 sequence-wise balance statistic sum_i f_i * P_i, averaged over sequences.

  f_i = E / (k T) * (assignments to expert i in the sequence), P_i = mean over the sequence's
  tokens of the normalized affinity s_i / sum_j s_j. Multiply by alpha for the loss.
  """
  B, T, E = scores_BTE.shape
  k = cfg.num_experts_per_tok
  counts = jax.nn.one_hot(ids_BTk, E, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
  f = jax.lax.stop_gradient(counts) * E / (k * T)
  P = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(axis=1)
  return (f * P).sum(-1).mean()
