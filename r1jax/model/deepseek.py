"""The MoE decoder (DeepSeek-V3/V2 with MLA, Qwen3-MoE with GQA): embeddings, the dense and MoE
layer stacks scanned run by run in layer order, final norm, head, MTP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.model import dense as dense_lib
from r1jax.model import layers as L
from r1jax.model import mla as mla_lib
from r1jax.model import moe as moe_lib
from r1jax.model.layers import embed, head


def decoder_layer(p, x, cos, sin, mask, cfg: ModelConfig, token_mask=None, replay_ids=None):
  """Pre-norm block: x + attention(norm(x)) (MLA or GQA, `cfg.attention`), then + FFN(norm(.))
  with a dense MLP or the MoE. Returns the new residual stream and MoE stats (None for a dense
  layer)."""
  dtype = cfg.jnp_dtype
  h = L.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  attention = mla_lib.mla if cfg.attention == "mla" else dense_lib.gqa
  x = x + attention(p["attn"], h, cos, sin, mask, cfg)
  h = L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  if "moe" in p:
    y, stats = moe_lib.moe_block(p["moe"], h, cfg, token_mask, replay_ids)
  else:
    y, stats = L.swiglu_mlp(p["mlp"], h, dtype, cfg.fp8), None
  return x + y, stats


def _scan_layers(stacked, x, cos, sin, mask, cfg: ModelConfig, token_mask=None, routing=None):
  """Run a stack of same-shaped layers with lax.scan; returns x and per-layer MoE stats.
  routing [L, B, T, k]: each layer's replayed expert ids (R3), or None."""
  def body(carry, inputs):
    layer_params, replay_ids = inputs
    out, stats = decoder_layer(layer_params, carry, cos, sin, mask, cfg, token_mask, replay_ids)
    return out, stats

  body = L.maybe_remat(body, cfg.remat)
  return jax.lax.scan(body, x, (stacked, routing))


def run_slice(stacked, start: int, count: int):
  """Layers [start, start + count) of a stacked tree (the whole stack as it is if that is all)."""
  n = jax.tree.leaves(stacked)[0].shape[0]
  if start == 0 and count == n:
    return stacked
  return jax.tree.map(lambda a: a[start:start + count], stacked)


def forward_hidden(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                   token_mask=None, routing=None):
  """Tokens [B, T] -> (last hidden before the final norm [B, T, D], aux dict, rope/mask ctx).
  routing [B, T, L_moe, k]: expert ids to replay in the MoE layers (R3), or None."""
  if positions is None:
    positions = L.default_positions(tokens, segment_ids)
  if segment_ids is None:
    segment_ids = jnp.zeros_like(tokens)
  cos, sin = L.rope_cos_sin(cfg, positions)
  mask = L.attention_mask(segment_ids, segment_ids, positions, positions)
  x = embed(params, tokens, cfg)
  aux = {}
  replay = None if routing is None else jnp.moveaxis(routing, 2, 0)  # [L_moe, B, T, k]
  moe_stats = []
  for stack, start, count in cfg.layer_runs:
    layers = run_slice(params[stack], start, count)
    if stack == "moe_layers":
      ids = None if replay is None else replay[start:start + count]
      x, stats = _scan_layers(layers, x, cos, sin, mask, cfg, token_mask, ids)
      moe_stats.append(stats)
    else:
      x, _ = _scan_layers(layers, x, cos, sin, mask, cfg)
  if moe_stats:
    stats = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *moe_stats)
    aux["expert_counts"] = stats["counts"]  # [L_moe, E]
    aux["expert_ids"] = stats["ids"]  # [L_moe, B, T, k]
    aux["balance"] = stats["balance"].sum()
    aux["dropped"] = stats["dropped"].sum()
  return x, aux, (cos, sin, mask, token_mask)


def mtp_logits(params, tokens, h, ctx, cfg: ModelConfig):
  """Multi-token prediction, depth k = 1..D: position i of module k predicts token i + k + 1.

  h_k = Layer_k(eh_proj[RMSNorm(Emb(t_{i+k})); RMSNorm(h_{k-1})]); logits = head(norm_k(h_k)).
  The embeddings of the shifted tokens beyond the sequence end are of token 0; those positions
  have no target and are masked by the loss. Returns ([D, B, T, V] fp32 logits, aux).
  """
  cos, sin, mask, token_mask = ctx
  dtype = cfg.jnp_dtype
  T = tokens.shape[1]

  def body(carry, inputs):
    h_prev, shifted = carry
    p = inputs
    shifted = jnp.concatenate([shifted[:, 1:], jnp.zeros_like(shifted[:, :1])], axis=1)
    e = L.rms_norm(embed(params, shifted, cfg), p["enorm"], cfg.rms_norm_eps)
    hn = L.rms_norm(h_prev, p["hnorm"], cfg.rms_norm_eps)
    x = L.dense(jnp.concatenate([e, hn], axis=-1), p["eh_proj"], dtype)
    x, stats = decoder_layer(p["layer"], x, cos, sin, mask, cfg, token_mask)
    logits = head(params, L.rms_norm(x, p["norm"], cfg.rms_norm_eps), cfg)
    return (x, shifted), (logits, stats)

  assert T >= 1
  _, (logits, stats) = jax.lax.scan(L.maybe_remat(body, cfg.remat), (h, tokens), params["mtp"])
  aux = {}
  if stats is not None:
    aux = {"mtp_expert_counts": stats["counts"], "mtp_balance": stats["balance"].sum()}
  return logits, aux


def forward_with_aux(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                     mtp: bool = False, token_mask=None, routing=None):
  x, aux, ctx = forward_hidden(params, tokens, cfg, segment_ids=segment_ids, positions=positions,
                               token_mask=token_mask, routing=routing)
  logits = head(params, L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cfg)
  if mtp and "mtp" in params:
    aux["mtp_logits"], mtp_aux = mtp_logits(params, tokens, x, ctx, cfg)
    aux.update(mtp_aux)
  return logits, aux
