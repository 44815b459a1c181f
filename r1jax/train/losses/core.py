"""Loss functions. Each takes logits/targets/masks and returns a scalar (plus parts to log).

Shapes: B batch, T length, V vocab. `mask` is float [B, T], 1 where the target counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprobs(logits_BTV, targets_BT):
  """log p(target) per position, fp32 [B, T]."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]


def cross_entropy(logits_BTV, targets_BT, mask_BT):
  """Masked token cross-entropy, averaged over counted tokens."""
  return masked_mean(-token_logprobs(logits_BTV, targets_BT), mask_BT)


def mtp_targets(targets_BT, mask_BT, segment_ids_BT, depth: int):
  """Targets and mask for MTP module `depth` (1-based): position i predicts targets[i + depth],
  counted only when that target is in the same segment and counted in the main loss."""
  T = targets_BT.shape[1]
  pad = lambda x: jnp.pad(x[:, depth:], ((0, 0), (0, min(depth, T))))[:, :T]
  same = pad(segment_ids_BT) == segment_ids_BT
  return pad(targets_BT), pad(mask_BT) * same * mask_BT


def mtp_loss(mtp_logits_DBTV, targets_BT, mask_BT, segment_ids_BT, *, logprobs: bool = False):
  """Mean over MTP depths of the masked cross-entropy (DeepSeek-V3: lambda/D * sum_k L_k).
  logprobs: the first argument is [D, B, T] log p of each depth's targets (the model's
  `mtp_logprobs`, under `logits_chunk`) instead of [D, B, T, V] logits."""
  D = mtp_logits_DBTV.shape[0]
  total = 0.0
  for k in range(D):
    t, m = mtp_targets(targets_BT, mask_BT, segment_ids_BT, k + 1)
    total = total + (masked_mean(-mtp_logits_DBTV[k], m) if logprobs
                     else cross_entropy(mtp_logits_DBTV[k], t, m))
  return total / D


def distill_divergence(student_BTV, teacher_BTV, mask_BT, kind: str, temperature: float,
                       jsd_beta: float = 0.5):
  """Token-level divergence between teacher and student distributions at `temperature`,
  scaled by T^2 (so gradients keep their size as T changes), masked mean over tokens.

  kind: "forward_kl" KL(p_teacher || q_student), "reverse_kl" KL(q || p),
        "jsd" beta*KL(p||m) + (1-beta)*KL(q||m) with m = beta*p + (1-beta)*q.
  """
  per_tok = divergence_per_token(student_BTV, teacher_BTV, kind, temperature, jsd_beta)
  return masked_mean(per_tok, mask_BT) * temperature * temperature


def divergence_per_token(student_BTV, teacher_BTV, kind: str, temperature: float,
                         jsd_beta: float = 0.5):
  """`distill_divergence`'s per-position divergence [B, T] (fp32; no T^2, no mean): what a
  loss that forms the logits a chunk of positions at a time sums."""
  t = temperature
  log_q = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BTV).astype(jnp.float32) / t, -1)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  if kind == "forward_kl":
    per_tok = jnp.sum(p * (log_p - log_q), -1)
  elif kind == "reverse_kl":
    per_tok = jnp.sum(q * (log_q - log_p), -1)
  elif kind == "jsd":
    log_m = jnp.logaddexp(jnp.log(jsd_beta) + log_p, jnp.log1p(-jsd_beta) + log_q)
    per_tok = (jsd_beta * jnp.sum(p * (log_p - log_m), -1) +
               (1 - jsd_beta) * jnp.sum(q * (log_q - log_m), -1))
  else:
    raise ValueError(f"unknown divergence {kind!r}")
  return per_tok


def expert_load_max_over_mean(counts_LE):
  """Max over layers of (max expert load / mean expert load): 1.0 is perfectly balanced."""
  c = counts_LE.reshape(-1, counts_LE.shape[-1])
  return jnp.max(c.max(-1) / jnp.maximum(c.mean(-1), 1e-9))


def bias_update(bias_LE, counts_LE, gamma: float):
  """Aux-loss-free balancing: raise the bias of underloaded experts and lower it for
  overloaded ones by gamma (DeepSeek-V3: bias_i += gamma * sign(mean load - load_i))."""
  err = counts_LE.mean(-1, keepdims=True) - counts_LE
  return bias_LE + gamma * jnp.sign(err)
