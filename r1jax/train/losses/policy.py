"""Policy-gradient losses as registries: a policy loss (which ratio it clips: token or sequence
level), an aggregation over tokens, and an importance correction for rollout-vs-trainer mismatch.
A new loss is one registered function.

Shapes: B sequences, T positions; mask [B, T] marks the completion tokens that count.

Policy losses, `@register_policy_loss(name, level)`; fn(ratio [B, T], adv [B, 1], eps_low,
eps_high) -> per-token loss [B, T]:
  grpo  level "token":    rho_t = exp(logp_t - old_t)
  gspo  level "sequence": s = exp(sum_t (logp_t - old_t) / |y|), the same for every token of
                          the sequence (GSPO, Zheng et al. 2025: a length-normalized sequence
                          ratio, clipped with a small range, e.g. eps 3e-4 / 4e-4)
  both:  l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)

Aggregations, `@register_aggregation(name)`; fn(per_tok, mask, budget) -> (value, weight), where
value is the loss and weight its normalizer, so that micro-batches combine into the full batch's
value as sum(value * weight) / sum(weight) (`r1jax.train.step`):
  grpo     mean over sequences of each sequence's token mean     (weight: sequences)
  bnpo     token mean over the batch                             (weight: tokens)
  dapo     the same as bnpo (DAPO's token-level loss)            (weight: tokens)
  dr_grpo  token sum / (B x completion budget)                   (weight: B x budget)

Importance corrections (`IS_CORRECTIONS`) for when the policy that sampled (log-probs
logp_rollout from the sampler) and the policy being trained (logp_old, the trainer's log-probs at
the same parameters) differ, as they do when the rollout runs a different engine, precision or
expert routing. With w = exp(logp_old - logp_rollout) per token (token level) or
exp(sum_t (logp_old - logp_rollout)) per sequence (sequence level, the product of token ratios):
  token_tis / seq_tis   each token's loss is multiplied by min(w, C)  (truncated IS)
  token_mis / seq_mis   tokens (sequences) with w outside [C_low, C] are masked out (masked IS)
The weights carry no gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

POLICY_LOSSES: dict[str, tuple[str, Callable]] = {}
AGGREGATIONS: dict[str, Callable] = {}
RATIO_LEVELS = ("token", "sequence")
IS_CORRECTIONS = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis")


def register_policy_loss(name: str, level: str):
  assert level in RATIO_LEVELS, level

  def wrap(fn):
    POLICY_LOSSES[name] = (level, fn)
    return fn
  return wrap


def register_aggregation(name: str):
  def wrap(fn):
    AGGREGATIONS[name] = fn
    return fn
  return wrap


def _ppo_clip(ratio, adv, eps_low: float, eps_high: float):
  return -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)


register_policy_loss("grpo", "token")(_ppo_clip)
register_policy_loss("gspo", "sequence")(_ppo_clip)


def log_ratio(logp, old, mask, level: str):
  """log of the ratio each token's loss uses, [B, T]: per token, or the sequence's mean over its
  completion tokens broadcast to every position (GSPO)."""
  d = (logp - old) * mask
  if level == "token":
    return d
  n = jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1.0)
  return jnp.broadcast_to(jnp.sum(d, 1, keepdims=True) / n, d.shape)


@register_aggregation("grpo")
def _seq_mean(per_tok, mask, budget):
  del budget
  per_seq = jnp.sum(per_tok * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
  return jnp.mean(per_seq), jnp.asarray(per_tok.shape[0], jnp.float32)


def _token_mean(per_tok, mask, budget):
  del budget
  n = jnp.sum(mask)
  return jnp.sum(per_tok * mask) / jnp.maximum(n, 1.0), n


register_aggregation("bnpo")(_token_mean)
register_aggregation("dapo")(_token_mean)


@register_aggregation("dr_grpo")
def _budget_sum(per_tok, mask, budget):
  weight = jnp.asarray(per_tok.shape[0] * budget, jnp.float32)
  return jnp.sum(per_tok * mask) / weight, weight


def is_correction(old_logp, rollout_logp, mask, kind: str, high: float, low: float):
  """(weights [B, T], keep mask [B, T]) of the importance correction `kind` (module docstring);
  no gradient flows through either."""
  ones = jnp.ones_like(mask)
  if kind == "none":
    return ones, ones
  d = jax.lax.stop_gradient((old_logp - rollout_logp) * mask)
  if kind.startswith("seq"):
    d = jnp.broadcast_to(jnp.sum(d, 1, keepdims=True), d.shape)
  w = jnp.exp(d)
  if kind.endswith("tis"):
    return jnp.minimum(w, high), ones
  return ones, ((w >= low) & (w <= high)).astype(mask.dtype)
