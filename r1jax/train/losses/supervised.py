"""Loss plug-ins for the generic step: SFT (with the MoE extras) and logit distillation.

Batches hold tokens, targets, loss_mask, segment_ids, positions [B, T] (see r1jax.data).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax import model
from r1jax.model.config import ModelConfig
from r1jax.model.moe import dispatch
from r1jax.train.losses import core

MOE_BIAS = "moe_layers/moe/router_bias"
MTP_BIAS = "mtp/layer/moe/router_bias"


def _forward(params, batch, cfg: ModelConfig, mtp: bool):
  return model.forward_with_aux(params, batch["tokens"], cfg, segment_ids=batch["segment_ids"],
                                token_mask=batch["segment_ids"] > 0,
                                positions=batch["positions"], mtp=mtp)


def moe_metrics(aux, cfg: ModelConfig, num_tokens: int):
  """Load-balance metrics and the expert counts the bias update consumes."""
  m, counts = {}, {}
  if "expert_counts" in aux:
    counts[MOE_BIAS] = aux["expert_counts"]
    assignments = num_tokens * cfg.num_experts_per_tok * cfg.num_moe_layers
    m["moe_drop_frac"] = aux["dropped"] / assignments
    m["balance"] = aux["balance"]
    if dispatch.has_fast_buffers(cfg):  # exchanges per MoE layer, 1.0 where the routing fit
      m["moe_exchange_rounds"] = aux["moe_rounds"] / cfg.num_moe_layers
  if "mtp_expert_counts" in aux:
    counts[MTP_BIAS] = aux["mtp_expert_counts"]
  m["_counts"] = counts
  return m


def sft_loss(cfg: ModelConfig, *, mtp_weight: float = 0.0, balance_alpha: float = 0.0):
  """Masked next-token CE on completion tokens + mtp_weight * MTP CE + alpha * balance."""
  use_mtp = mtp_weight > 0 and cfg.is_moe and cfg.num_nextn_predict_layers > 0

  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    logp, _, aux = model.target_logprobs(
        params, batch["tokens"], batch["targets"], cfg, segment_ids=batch["segment_ids"],
        token_mask=batch["segment_ids"] > 0, positions=batch["positions"], mtp=use_mtp)
    ce = core.masked_mean(-logp, batch["loss_mask"])  # = core.cross_entropy of the logits
    n = jnp.sum(batch["loss_mask"])
    loss, metrics = ce, {"ce": ce, "tokens": n, "_weight": n}  # a token mean
    if use_mtp:
      chunked = "mtp_logprobs" in aux  # cfg.logits_chunk: no [D, B, T, V] logits
      mtp = core.mtp_loss(aux["mtp_logprobs" if chunked else "mtp_logits"], batch["targets"],
                          batch["loss_mask"], batch["segment_ids"], logprobs=chunked)
      loss, metrics["mtp_loss"] = loss + mtp_weight * mtp, mtp
    metrics.update(moe_metrics(aux, cfg, jnp.sum(batch["segment_ids"] > 0)))
    if balance_alpha and "balance" in metrics:
      loss = loss + balance_alpha * metrics["balance"]
    return loss, metrics

  return loss_fn


def distill_loss(student_cfg: ModelConfig, teacher_cfg: ModelConfig, *, kind: str = "forward_kl",
                 temperature: float = 1.0, ce_weight: float = 0.0):
  """Logit distillation: (1 - ce_weight) * divergence(teacher, student) + ce_weight * CE.
  The teacher (frozen params passed to the step) runs in the same jitted step.

  With the student's `logits_chunk` set, both heads, the divergence and the CE run that many
  positions of every row at a time (`model.map_position_chunks`), each chunk recomputed in the
  backward pass: no [B, T, V] logits of either model exist, only [B, chunk, V] ones."""
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise ValueError("teacher and student must share the tokenizer (vocab sizes differ: "
                     f"{teacher_cfg.vocab_size} vs {student_cfg.vocab_size})")

  def chunked(params, batch, teacher_params):
    kw = dict(segment_ids=batch["segment_ids"], token_mask=batch["segment_ids"] > 0,
              positions=batch["positions"])
    h, aux = model.hidden_states(params, batch["tokens"], student_cfg, **kw)
    h_t, _ = model.hidden_states(teacher_params, batch["tokens"], teacher_cfg, **kw)

    def one(h_c, h_t_c, targets_c):
      logits = model.head(params, h_c, student_cfg)
      div = core.divergence_per_token(logits, model.head(teacher_params, h_t_c, teacher_cfg),
                                      kind, temperature)
      return div, -core.token_logprobs(logits, targets_c)

    div, nll = model.map_position_chunks(one, (h, h_t, batch["targets"]),
                                         student_cfg.logits_chunk)
    mask = batch["loss_mask"]
    return core.masked_mean(div, mask) * temperature ** 2, core.masked_mean(nll, mask), aux

  def loss_fn(params, batch, rng, teacher_params):
    del rng
    teacher_params = jax.lax.stop_gradient(teacher_params)
    mask = batch["loss_mask"]
    if student_cfg.logits_chunk:
      div, ce, aux = chunked(params, batch, teacher_params)
    else:
      logits, aux = _forward(params, batch, student_cfg, False)
      t_logits, _ = _forward(teacher_params, batch, teacher_cfg, False)
      div = core.distill_divergence(logits, t_logits, mask, kind, temperature)
      ce = core.cross_entropy(logits, batch["targets"], mask)
    metrics = {"ce": ce, "divergence": div, "tokens": jnp.sum(mask), "_weight": jnp.sum(mask)}
    metrics.update(moe_metrics(aux, student_cfg, jnp.sum(batch["segment_ids"] > 0)))
    return (1 - ce_weight) * div + ce_weight * ce, metrics

  return loss_fn
