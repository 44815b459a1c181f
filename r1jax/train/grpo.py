"""GRPO and its variants as a loss plug-in for the generic step, plus group advantages.

Batch (B rollouts of length T = prompt + completion, left-padded prompts):
  tokens, targets, segment_ids, positions  int32 [B, T]
  loss_mask     float32 [B, T]  1 where targets[t] is a generated (non-pad) completion token
  old_logprobs  float32 [B, T]  log pi_old(targets[t]) from the sampler (0 elsewhere)
  advantages    float32 [B]
Per token: rho = exp(logp - old), l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
+ beta * k3(ref, logp), k3 = exp(ref - logp) - (ref - logp) - 1; aggregated by `loss_type`:
  grpo: mean over sequences of the per-sequence token mean;  bnpo / dapo: token mean over the
  batch;  dr_grpo: token sum / (B * completion budget).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import model
from r1jax.config import ModelConfig
from r1jax.train import losses
from r1jax.train.objectives import moe_metrics

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-4):
  """(r - mean of its group) / (std + eps); std of the group, of the batch, or none (Dr. GRPO).
  rewards [B] with groups contiguous. Returns advantages [B] and the zero-variance group mask."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centered = r - r.mean(1, keepdims=True)
  if scale == "group":
    adv = centered / (r.std(1, keepdims=True) + eps)
  elif scale == "batch":
    adv = centered / (r.std() + eps)
  elif scale == "none":
    adv = centered
  else:
    raise ValueError(f"advantage scale {scale!r} must be group, batch or none")
  return adv.reshape(-1).astype(np.float32), (r.std(1) == 0)


def aggregate(per_tok, mask, loss_type: str, budget: int):
  if loss_type == "grpo":
    per_seq = jnp.sum(per_tok * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
    return jnp.mean(per_seq)
  if loss_type in ("bnpo", "dapo"):
    return jnp.sum(per_tok * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if loss_type == "dr_grpo":
    return jnp.sum(per_tok * mask) / (mask.shape[0] * budget)
  raise ValueError(f"loss_type {loss_type!r} must be one of {LOSS_TYPES}")


def per_token_terms(logp, old_logp, ref_logp, adv_B, *, eps_low: float, eps_high: float,
                    beta: float):
  """Per-token loss and its parts: (loss, ratio, kl)."""
  ratio = jnp.exp(logp - old_logp)
  a = adv_B[:, None]
  pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
  kl = jnp.zeros_like(logp)
  if ref_logp is not None:
    d = ref_logp - logp
    kl = jnp.exp(d) - d - 1
  return pg + beta * kl, ratio, kl


def grpo_loss(cfg: ModelConfig, *, loss_type: str = "grpo", eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, budget: int = 1):
  """Loss plug-in; `frozen` is the reference model's params when beta > 0 (else None).
  `budget` is the completion token budget (Dr. GRPO's constant normalizer)."""
  assert loss_type in LOSS_TYPES, loss_type

  def forward(params, batch):
    return model.forward_with_aux(params, batch["tokens"], cfg, segment_ids=batch["segment_ids"],
                                  token_mask=batch["segment_ids"] > 0,
                                  positions=batch["positions"])

  def loss_fn(params, batch, rng, ref_params):
    del rng
    logits, aux = forward(params, batch)
    logp = losses.token_logprobs(logits, batch["targets"])
    ref_logp = None
    if beta > 0:
      ref_logits, _ = forward(jax.lax.stop_gradient(ref_params), batch)
      ref_logp = losses.token_logprobs(ref_logits, batch["targets"])
    mask = batch["loss_mask"]
    per_tok, ratio, kl = per_token_terms(logp, batch["old_logprobs"], ref_logp,
                                         batch["advantages"], eps_low=eps_low,
                                         eps_high=eps_high, beta=beta)
    loss = aggregate(per_tok, mask, loss_type, budget)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    a = batch["advantages"][:, None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), -1)
    metrics = {
        "pg_loss": aggregate(per_tok - beta * kl, mask, loss_type, budget),
        "kl": jnp.sum(kl * mask) / n,
        "clip_frac_low": jnp.sum(((ratio < 1 - eps_low) & (a < 0)) * mask) / n,
        "clip_frac_high": jnp.sum(((ratio > 1 + eps_high) & (a > 0)) * mask) / n,
        "entropy": jnp.sum(entropy * mask) / n,
        "tokens": jnp.sum(mask),
    }
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    metrics.update(moe_metrics(aux, cfg, jnp.sum(batch["segment_ids"] > 0)))
    return loss, metrics

  return loss_fn
