"""Dense decoder (Qwen2, Qwen3, Llama): GQA with optional q/k/v bias (Qwen2) and per-head q/k
RMSNorm before RoPE (Qwen3), rotate-half RoPE, SwiGLU MLP, RMSNorm, optionally tied embeddings."""

from __future__ import annotations

import jax

from r1jax.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model.layers import embed, head


def qkv(p, x, cos, sin, cfg: ModelConfig):
  """Rotated q [B,T,H,d], k [B,T,K,d] and v [B,T,K,d]."""
  dtype = cfg.jnp_dtype
  q, k, v = (L.dense(x, p[n], dtype, cfg.fp8) for n in ("q", "k", "v"))
  if "q_bias" in p:
    q, k, v = (t + p[f"{n}_bias"].astype(dtype) for t, n in ((q, "q"), (k, "k"), (v, "v")))
  if "q_norm" in p:  # Qwen3: over each head's head_dim, before the rotation
    eps = cfg.rms_norm_eps
    q, k = L.rms_norm(q, p["q_norm"], eps), L.rms_norm(k, p["k_norm"], eps)
  return L.apply_rope(q, cos, sin, False), L.apply_rope(k, cos, sin, False), v


def out_proj(p, attn_out, dtype, fp8: bool = False):
  return L.dense(attn_out.reshape(*attn_out.shape[:2], -1),
                 p["o"].reshape(-1, p["o"].shape[-1]), dtype, fp8)


def gqa(p, x, cos, sin, mask, cfg: ModelConfig):
  """Grouped-query self-attention of x [B, T, D] (the training and prefill forward)."""
  q, k, v = qkv(p, x, cos, sin, cfg)
  out = L.attend(q, k, v, mask, L.softmax_scale(cfg), cfg.attn_chunk)
  return out_proj(p, out, cfg.jnp_dtype, cfg.fp8)


def decoder_layer(p, x, cos, sin, mask, cfg: ModelConfig):
  dtype = cfg.jnp_dtype
  h = L.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  x = x + gqa(p["attn"], h, cos, sin, mask, cfg)
  h = L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  return x + L.swiglu_mlp(p["mlp"], h, dtype, cfg.fp8)


def forward_with_aux(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                     mtp: bool = False):
  del mtp  # dense students have no MTP module
  if positions is None:
    positions = L.default_positions(tokens, segment_ids)
  if segment_ids is None:
    segment_ids = tokens * 0
  cos, sin = L.rope_cos_sin(cfg, positions)
  mask = L.attention_mask(segment_ids, segment_ids, positions, positions)

  def body(x, p):
    return decoder_layer(p, x, cos, sin, mask, cfg), None

  x, _ = jax.lax.scan(L.maybe_remat(body, cfg.remat), embed(params, tokens, cfg),
                      params["layers"])
  return head(params, L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cfg), {}
