"""Multi-head latent attention (DeepSeek-V2/V3), full-sequence form for training and prefill.

q = q_b(RMSNorm(q_a(x))) (or q(x) without q-LoRA), split per head into q_nope | q_pe.
kv_a(x) -> [latent (kv_lora_rank) | k_pe (rope dim, one key shared by all heads)];
kv_b(RMSNorm(latent)) -> per head [k_nope | v]. RoPE touches q_pe and k_pe only.
"""

from __future__ import annotations

import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.model import layers as L

# HF builds q_a_layernorm / kv_a_layernorm with the default eps, not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


def project_q(p, x, cfg: ModelConfig, dtype):
  """Queries [B, T, H, qk_nope + qk_rope] before RoPE."""
  if cfg.q_lora_rank:
    q_latent = L.rms_norm(L.dense(x, p["q_a"], dtype, cfg.fp8), p["q_norm"], LATENT_NORM_EPS)
    return L.dense(q_latent, p["q_b"], dtype, cfg.fp8)
  return L.dense(x, p["q"], dtype, cfg.fp8)


def project_latent(p, x, cfg: ModelConfig, dtype):
  """Normed latent [B, T, kv_lora_rank] and un-rotated shared rope key [B, T, rope]."""
  kv = L.dense(x, p["kv_a"], dtype, cfg.fp8)
  latent, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
  return L.rms_norm(latent, p["kv_norm"], LATENT_NORM_EPS), k_pe


def mla(p, x, cos, sin, mask, cfg: ModelConfig):
  """x [B, T, D] -> [B, T, D]; cos/sin [B, T, rope/2]; mask [B, 1, T, T]."""
  dtype = cfg.jnp_dtype
  H = cfg.num_attention_heads
  q = project_q(p, x, cfg, dtype)
  q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
  q_pe = L.apply_rope(q_pe, cos, sin, cfg.rope_interleave)
  latent, k_pe = project_latent(p, x, cfg, dtype)
  k_pe = L.apply_rope(k_pe[:, :, None, :], cos, sin, cfg.rope_interleave)
  kv = L.dense(latent, p["kv_b"], dtype, cfg.fp8)  # [B, T, H, nope + v]
  k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
  B, T = x.shape[:2]
  k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (B, T, H, cfg.qk_rope_head_dim))], -1)
  q = jnp.concatenate([q_nope, q_pe], -1)
  out = L.attend(q, k, v, mask, L.softmax_scale(cfg), cfg.attn_chunk)
  # heads and head_dim flattened into one contraction (what the FP8 GEMM takes)
  return L.dense(out.reshape(B, T, -1), p["o"].reshape(-1, p["o"].shape[-1]), dtype, cfg.fp8)
