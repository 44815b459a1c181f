"""Functional models of every family through one decoder (`decoder`, built from `block`).

  config    ModelConfig: HF field names, presets, validation, config.json both ways
  params    one declaration of every parameter (shapes, logical axes, init)
  layers    norms, embed/head, RoPE, attention core, SwiGLU, KV-cache slots
  mla, gqa  the attention families: full-sequence and cached forms, cache shapes
  moe       the MoE package (routing, experts, expert-parallel dispatch, block)
  block     the one decoder block and the table (`ATTENTION`) that picks its attention
  decoder   layer stacks run by run, MTP, and generation on a KV cache
  lora      adapters: init, merge, shardings, export


    logits = model.forward(params, tokens, cfg)          # int32 [B, T] -> fp32 [B, T, V]
    logits, aux = model.forward_with_aux(params, tokens, cfg, mtp=True)
    scores, aux = model.reward_scores(params, tokens, cfg, last=last)  # classifiers: [B, labels]
    params = model.init(cfg, jax.random.key(0))
"""

from __future__ import annotations

import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model import decoder, layers
from r1jax.model.params import abstract, declare, init, logical_axes, num_params


def forward_with_aux(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                     mtp: bool = False, token_mask=None, routing=None, prefix=None,
                     mtp_detach: bool = False):
  """Logits [B, T, V] fp32 and aux: expert_counts [L_moe, E], balance (sequence-wise balance
  statistic summed over MoE layers), dropped (dropped expert assignments), and with mtp=True
  mtp_logits [D_mtp, B, T, V] where module k's position i predicts token i + k + 1.

  segment_ids [B, T] (packed sequences): attention never crosses segments, and positions
  restart at each segment start unless `positions` is given.

  token_mask [B, T] bool (MoE only): tokens marked False (padding) are routed to no expert, so
  they take no expert capacity and do not count in expert_counts (nor in the correction-bias
  update); their outputs are meaningless and must be masked by the loss.

  routing [B, T, L_moe, k] int (MoE only): routing replay (R3): each MoE layer uses these
  expert ids instead of its top-k (the ids the sampler recorded, or `aux["expert_ids"]` of an
  earlier forward); gate weights still come from the current router. aux["expert_ids"]
  [L_moe, B, T, k] holds the experts each token went to (id E for padding).

  prefix: (tokens, positions, valid) [B // G, Lp], a prefix shared by each G consecutive rows
  and computed once per group; the logits are then those of `tokens`, which follow it in each
  row (`decoder.forward_hidden_prefix`; segment_ids > 0 marks their real tokens).

  mtp_detach: the MTP modules' loss trains their own weights only; no gradient reaches the trunk
  or the embedding and LM head they share with it (a draft trained beside a policy).

  A sequence classifier (cfg.num_labels > 0) has no LM head: ConfigError (`reward_scores`).
  """
  layers.require_lm_head(cfg, "model.forward")
  return decoder.forward_with_aux(params, tokens, cfg, segment_ids=segment_ids,
                                  positions=positions, mtp=mtp, token_mask=token_mask,
                                  routing=routing, prefix=prefix, mtp_detach=mtp_detach)


def forward(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
            token_mask=None, routing=None):
  """Tokens int32 [B, T] -> float32 logits [B, T, V]."""
  return forward_with_aux(params, tokens, cfg, segment_ids=segment_ids, positions=positions,
                          token_mask=token_mask, routing=routing)[0]


def hidden_states(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                  token_mask=None):
  """The final-normed hidden states [B, T, D] that the LM (or score) head takes, and aux (as
  `forward_with_aux`): for losses that run the head themselves, a chunk of positions at a time
  (`map_position_chunks` with `head`), so that no [B, T, V] logits exist."""
  x, aux, _ = decoder.forward_hidden(params, tokens, cfg, segment_ids=segment_ids,
                                     positions=positions, token_mask=token_mask)
  return layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), aux


def reward_scores(params, tokens, cfg: ModelConfig, *, last, segment_ids=None, positions=None,
                  token_mask=None):
  """A sequence classifier's (cfg.num_labels > 0; a reward model with 1) scores: HF
  *ForSequenceClassification's `score` head on the final-normed hidden at each row's last real
  token.

  tokens int32 [B, T]; last int32 [B], the index of each row's last real token (right padding:
  its length - 1). segment_ids, positions, token_mask: as `forward_with_aux`'s (token_mask False
  on padding keeps it out of the MoE experts and their counts). Returns (float32 scores
  [B, num_labels], aux as `hidden_states`'s: the MoE expert_counts, balance, dropped). Only
  the B picked rows go through the head.
  """
  h_BTD, aux = hidden_states(params, tokens, cfg, segment_ids=segment_ids, positions=positions,
                             token_mask=token_mask)
  last_B = jnp.asarray(last, jnp.int32)
  h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
  return layers.score_head(params, h_BD, cfg), aux


head = layers.head
map_position_chunks = decoder.map_position_chunks


def target_logprobs(params, tokens, targets, cfg: ModelConfig, *, segment_ids=None,
                    positions=None, mtp: bool = False, token_mask=None, routing=None,
                    entropy: bool = False, temperature: float = 1.0, prefix=None,
                    mtp_detach: bool = False):
  """(log p(targets) fp32 [B, T], per-position entropy [B, T] or None, aux): what the SFT and
  GRPO losses need, without the [B, T, V] logits when `cfg.logits_chunk` is set. Both are of
  softmax(logits / temperature): GRPO trains the distribution its rollouts sample from.
  prefix: (tokens, positions, valid) [B // G, Lp] of a prefix shared by each G consecutive rows,
  computed once per group (`decoder.forward_hidden_prefix`); tokens etc. are then what follows
  it in each row. mtp_detach: as `forward_with_aux`'s. With mtp and cfg.logits_chunk,
  aux["mtp_logprobs"] are at `temperature` too (without the chunking, aux["mtp_logits"] are the
  raw logits)."""
  layers.require_lm_head(cfg, "model.target_logprobs")
  assert prefix is None or not mtp, "MTP runs on whole rows"
  kw = dict(segment_ids=segment_ids, positions=positions, mtp=mtp, token_mask=token_mask,
            routing=routing, prefix=prefix, mtp_detach=mtp_detach)
  if cfg.logits_chunk:
    return decoder.chunked_target_logprobs(params, tokens, targets, cfg, entropy=entropy,
                                           temperature=temperature, **kw)
  logits, aux = forward_with_aux(params, tokens, cfg, **kw)
  return (*decoder.logits_logprobs(logits, targets, entropy, temperature), aux)


__all__ = ["forward", "forward_with_aux", "target_logprobs", "hidden_states", "reward_scores",
           "head", "map_position_chunks", "init", "abstract", "declare", "logical_axes",
           "num_params", "ModelConfig"]
