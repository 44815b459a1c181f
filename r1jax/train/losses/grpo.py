"""GRPO and its variants as a loss plug-in for the generic step, plus group advantages.

The batch is a `GRPOBatch` (B rollouts of T = prompt + completion positions, prompts
left-padded). Per token, with the registries of `r1jax.train.losses.policy`:
  l = policy_loss(ratio, A) * w_is + beta * k3(ref, logp),  k3 = exp(ref - logp) - (ref - logp) - 1
aggregated by `loss_type` over the completion tokens kept by the importance correction.

Mismatch metrics (names with "mismatch"), computed at the parameters the loss is evaluated at;
at the first update of a rollout batch those are the sampler's parameters, so they measure how
far the trainer's log-probs are from the sampler's for the same tokens:
  logp_mismatch_mean / _max   mean / max |logp_train - logp_rollout| over completion tokens
  mismatch_ratio_mean/min/max exp(logp_train - logp_rollout) over completion tokens
  mismatch_clip_frac          share of those ratios outside [1 - eps_low, 1 + eps_high]
On-policy (r1jax samples with the trainer's own model code, dropless MoE, same precision) these
are float noise: |ratio - 1| < 1e-5 and no token clipped.

Draft training (`draft_weight` > 0, slime's online MTP training): the loss adds
  draft_weight * CE of the MTP modules on the rollout's own completion tokens,
under softmax(logits / temperature), the distribution the speculative sampler drafts from. The
MTP modules run on the trunk's hidden states and the shared embedding and head with no gradient
through them (`model.forward_with_aux(mtp_detach=True)`), so every other weight's gradient is
the policy loss's alone; the step clips the MTP modules' gradient by its own norm
(`optim.make_optimizer(clip_apart="mtp")`), so their update leaves the policy's untouched.
Logged as `draft_loss`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from r1jax import model
from r1jax.model.config import ModelConfig
from r1jax.train.losses import core
from r1jax.train.losses import policy as pl
from r1jax.train.losses.supervised import moe_metrics

LOSS_TYPES = tuple(pl.AGGREGATIONS)


@flax.struct.dataclass
class GRPOBatch:
  """One GRPO update batch. Row b holds a left-padded prompt and its completion; position t
  predicts targets[b, t].

  Attributes:
    tokens, targets, segment_ids, positions: int32 [B, T].
    loss_mask: float32 [B, T], 1 where targets[b, t] is a generated completion token.
    rollout_logprobs: float32 [B, T], the sampler's log p(targets[b, t]) (0 elsewhere).
    old_logprobs: float32 [B, T], pi_old of the clipped ratio: the sampler's log-probs, or the
      trainer's own at the sampler's parameters when an importance correction is on.
    advantages: float32 [B].
    routing: int [B, T, L_moe, k] expert ids the sampler chose for each input token (R3), or
      None.
    prefix_tokens, prefix_positions, prefix_valid: int32 [B // G, Tp], or None. With them, each
      group of G consecutive rows shares this prompt prefix (valid 0 on its left padding), run
      once per group (`model.target_logprobs(prefix=...)`), and the [B, T] fields are what
      follows it in each row.
  """
  tokens: Any
  targets: Any
  segment_ids: Any
  positions: Any
  loss_mask: Any
  rollout_logprobs: Any
  old_logprobs: Any
  advantages: Any
  routing: Any = None
  prefix_tokens: Any = None
  prefix_positions: Any = None
  prefix_valid: Any = None

  @property
  def prefix(self):
    """The shared prefix as `model.target_logprobs` takes it, or None."""
    if self.prefix_tokens is None:
      return None
    return self.prefix_tokens, self.prefix_positions, self.prefix_valid > 0


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
  """The loss value of `loss_type` (policy_loss.AGGREGATIONS)."""
  if loss_type not in pl.AGGREGATIONS:
    raise ValueError(f"loss_type {loss_type!r} must be one of {LOSS_TYPES}")
  return pl.AGGREGATIONS[loss_type](per_tok, mask, budget)[0]


def per_token_terms(logp, old_logp, ref_logp, adv_B, *, eps_low: float, eps_high: float,
                    beta: float, policy_loss: str = "grpo", mask=None):
  """Per-token loss and its parts: (loss, ratio, kl). `mask` is needed by sequence-level
  ratios."""
  level, fn = pl.POLICY_LOSSES[policy_loss]
  if mask is None:
    mask = jnp.ones_like(logp)
  ratio = jnp.exp(pl.log_ratio(logp, old_logp, mask, level))
  pg = fn(ratio, adv_B[:, None], eps_low, eps_high)
  kl = jnp.zeros_like(logp)
  if ref_logp is not None:
    d = ref_logp - logp
    kl = jnp.exp(d) - d - 1
  return pg + beta * kl, ratio, kl


def _masked_stats(x, mask, n):
  big = jnp.finfo(jnp.float32).max
  return (jnp.sum(x * mask) / n, jnp.min(jnp.where(mask > 0, x, big)),
          jnp.max(jnp.where(mask > 0, x, -big)))


def grpo_loss(cfg: ModelConfig, *, loss_type: str = "grpo", policy_loss: str = "grpo",
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0, budget: int = 1,
              is_correction: str = "none", is_threshold: float = 2.0,
              is_threshold_low: float = 0.5, temperature: float = 1.0,
              draft_weight: float = 0.0):
  """Loss plug-in over `GRPOBatch`es; `frozen` is the reference model's params when beta > 0
  (else None). `budget` is the completion token budget (Dr. GRPO's constant normalizer). `cfg`
  must be the policy config the sampler ran (`rollout.sampler.policy_config`). `temperature`
  must be the rollouts' sampling temperature: every log-prob (policy, reference, entropy) is of
  softmax(logits / temperature), the distribution the sampler drew from and whose log-probs it
  returned, so the policy trained is the one sampled (TRL and verl do the same).
  `draft_weight`: train the MTP draft on the rollouts (module docstring)."""
  assert loss_type in pl.AGGREGATIONS, loss_type
  assert policy_loss in pl.POLICY_LOSSES, policy_loss
  assert is_correction in pl.IS_CORRECTIONS, is_correction

  draft = draft_weight > 0

  def forward(params, batch: GRPOBatch, entropy: bool, mtp: bool = False):
    return model.target_logprobs(params, batch.tokens, batch.targets, cfg,
                                 segment_ids=batch.segment_ids, token_mask=batch.segment_ids > 0,
                                 positions=batch.positions, routing=batch.routing,
                                 entropy=entropy, temperature=temperature, prefix=batch.prefix,
                                 mtp=mtp, mtp_detach=mtp)

  def loss_fn(params, batch: GRPOBatch, rng, ref_params):
    del rng
    logp, entropy, aux = forward(params, batch, entropy=True, mtp=draft)
    ref_logp = None
    if beta > 0:
      ref_logp, _, _ = forward(jax.lax.stop_gradient(ref_params), batch, entropy=False)
    w_is, keep = pl.is_correction(batch.old_logprobs, batch.rollout_logprobs, batch.loss_mask,
                                  is_correction, is_threshold, is_threshold_low)
    mask = batch.loss_mask * keep
    per_tok, ratio, kl = per_token_terms(logp, batch.old_logprobs, ref_logp, batch.advantages,
                                         eps_low=eps_low, eps_high=eps_high, beta=beta,
                                         policy_loss=policy_loss, mask=mask)
    pg = per_tok - beta * kl
    per_tok = pg * w_is + beta * kl
    loss, weight = pl.AGGREGATIONS[loss_type](per_tok, mask, budget)
    full = batch.loss_mask
    n = jnp.maximum(jnp.sum(full), 1.0)
    a = batch.advantages[:, None]
    lo, hi = 1 - eps_low, 1 + eps_high
    metrics = {
        "pg_loss": pl.AGGREGATIONS[loss_type](pg * w_is, mask, budget)[0],
        "kl": jnp.sum(kl * full) / n,
        "clip_frac_low": jnp.sum(((ratio < lo) & (a < 0)) * full) / n,
        "clip_frac_high": jnp.sum(((ratio > hi) & (a > 0)) * full) / n,
        "entropy": jnp.sum(entropy * full) / n,
        "tokens": jnp.sum(full),
        "is_kept_frac": jnp.sum(mask) / n,
        "_weight": weight,
    }
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"] = _masked_stats(
        ratio, full, n)
    diff = jax.lax.stop_gradient(logp - batch.rollout_logprobs)
    metrics["logp_mismatch_mean"], _, metrics["logp_mismatch_max"] = _masked_stats(
        jnp.abs(diff), full, n)
    mismatch = jnp.exp(diff)
    (metrics["mismatch_ratio_mean"], metrics["mismatch_ratio_min"],
     metrics["mismatch_ratio_max"]) = _masked_stats(mismatch, full, n)
    metrics["mismatch_clip_frac"] = jnp.sum(((mismatch < lo) | (mismatch > hi)) * full) / n
    if is_correction != "none":
      metrics["is_weight_mean"] = jnp.sum(w_is * full) / n
    if draft:
      metrics["draft_loss"] = draft_loss(aux, batch, temperature)
      loss = loss + draft_weight * metrics["draft_loss"]
    real = jnp.sum(batch.segment_ids > 0)
    if batch.prefix_valid is not None:
      real = real + jnp.sum(batch.prefix_valid > 0)  # each shared prefix token routed once
    metrics.update(moe_metrics(aux, cfg, real))
    return loss, metrics

  return loss_fn


def draft_loss(aux, batch: GRPOBatch, temperature: float):
  """The MTP modules' cross-entropy on the completion tokens, at `temperature` (the MTP outputs
  of `model.target_logprobs(mtp=True)`: log-probs under cfg.logits_chunk, else raw logits)."""
  if "mtp_logprobs" in aux:  # already at the temperature
    return core.mtp_loss(aux["mtp_logprobs"], batch.targets, batch.loss_mask, batch.segment_ids,
                         logprobs=True)
  return core.mtp_loss(aux["mtp_logits"] / temperature, batch.targets, batch.loss_mask,
                       batch.segment_ids)


def old_logprobs_fn(cfg: ModelConfig, temperature: float = 1.0):
  """jitted (params, batch) -> the trainer's log p(targets) [B, T] at `params` and `temperature`,
  no gradient: the old log-probs of an importance-corrected update."""
  def fn(params, batch: GRPOBatch):
    logp, _, _ = model.target_logprobs(params, batch.tokens, batch.targets, cfg,
                                       segment_ids=batch.segment_ids,
                                       token_mask=batch.segment_ids > 0,
                                       positions=batch.positions, routing=batch.routing,
                                       temperature=temperature, prefix=batch.prefix)
    return logp * batch.loss_mask
  return jax.jit(fn)
