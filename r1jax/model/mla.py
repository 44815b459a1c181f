"""Multi-head latent attention (DeepSeek-V2/V3): the attention family of the DeepSeek models.

`mla` is the full-sequence form (training, scoring); `mla_cached` the absorbed form the sampler
runs on its KV cache; `cache_shapes` what the cache holds per token.

q = q_b(RMSNorm(q_a(x))) (or q(x) without q-LoRA), split per head into q_nope | q_pe.
kv_a(x) -> [latent (kv_lora_rank) | k_pe (rope dim, one key shared by all heads)];
kv_b(RMSNorm(latent)) -> per head [k_nope | v]. RoPE touches q_pe and k_pe only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model.spec import ParamSpec

# HF builds q_a_layernorm / kv_a_layernorm with the default eps, not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


def declare(cfg: ModelConfig) -> dict:
  """The attention parameters of one layer (`params` stacks them)."""
  D, H = cfg.hidden_size, cfg.num_attention_heads
  p = {}
  if cfg.q_lora_rank:
    p["q_a"] = ParamSpec((D, cfg.q_lora_rank), ("embed", "q_lora"))
    p["q_norm"] = ParamSpec((cfg.q_lora_rank,), ("norm",), "ones")
    p["q_b"] = ParamSpec((cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"))
  else:
    p["q"] = ParamSpec((D, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"))
  p["kv_a"] = ParamSpec((D, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"))
  p["kv_norm"] = ParamSpec((cfg.kv_lora_rank,), ("norm",), "ones")
  p["kv_b"] = ParamSpec((cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                        ("kv_lora", "heads", "head_dim"))
  p["o"] = ParamSpec((H, cfg.v_head_dim, D), ("heads", "head_dim", "embed"))
  return p


def hf_entries(cfg: ModelConfig):
  """(path under the layer, HF key under `model.layers.{i}.`, input dims of a linear) per tensor."""
  if cfg.q_lora_rank:
    yield ("attn", "q_a"), "self_attn.q_a_proj.weight", 1
    yield ("attn", "q_norm"), "self_attn.q_a_layernorm.weight", 0
    yield ("attn", "q_b"), "self_attn.q_b_proj.weight", 1
  else:
    yield ("attn", "q"), "self_attn.q_proj.weight", 1
  yield ("attn", "kv_a"), "self_attn.kv_a_proj_with_mqa.weight", 1
  yield ("attn", "kv_norm"), "self_attn.kv_a_layernorm.weight", 0
  yield ("attn", "kv_b"), "self_attn.kv_b_proj.weight", 1
  yield ("attn", "o"), "self_attn.o_proj.weight", 2


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


def mla(p, x, cos, sin, mask, cfg: ModelConfig, zigzag: bool = False):
  """x [B, T, D] -> [B, T, D]; cos/sin [B, T, rope/2]; mask [B, 1, T, T]; zigzag: the positions
  are in `layers.zigzag_slots` order (context parallelism)."""
  dtype = cfg.jnp_dtype
  q = project_q(p, x, cfg, dtype)
  q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
  q_pe = L.apply_rope(q_pe, cos, sin, cfg.rope_interleave)
  latent, k_pe = project_latent(p, x, cfg, dtype)
  k_pe = L.apply_rope(k_pe[:, :, None, :], cos, sin, cfg.rope_interleave)
  # context parallelism: every device gathers the keys' latent and rope key (576 values per
  # token at V3 size) and expands them itself, rather than gathering per-head keys and values
  latent, k_pe = L.constrain_positions(latent, split=False), L.constrain_positions(k_pe, split=False)

  def expand(latent, k_pe, kv_b):
    kv = L.dense(latent, kv_b, dtype, cfg.fp8)  # [B, T, H, nope + v]
    k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    k_pe = jnp.broadcast_to(k_pe, k_nope.shape[:3] + (cfg.qk_rope_head_dim,))
    return jnp.concatenate([k_nope, k_pe], -1), v

  B, T = x.shape[:2]
  q = jnp.concatenate([q_nope, q_pe], -1)
  out = L.attend(q, latent, k_pe, mask, L.softmax_scale(cfg), cfg.attn_chunk, cfg.attn_impl,
                 cfg.attn_key_chunk, causal=True, zigzag=zigzag, expand=(expand, (p["kv_b"],)))
  # heads and head_dim flattened into one contraction (what the FP8 GEMM takes)
  return L.dense(out.reshape(B, T, -1), p["o"].reshape(-1, p["o"].shape[-1]), dtype, cfg.fp8)


def cache_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per token: the normed latent and the rotated shared rope key (576 values at V3 size)."""
  return {"latent": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)}


def mla_cached(p, x, cos, sin, mask, c, layer, index, cfg: ModelConfig):
  """Absorbed MLA of layer `layer`. x [B, t, D]; c = the stack's {latent [L, B, S, R],
  k_pe [L, B, S, r]}; mask [B, 1, t, S]."""
  dtype = cfg.jnp_dtype
  nope = cfg.qk_nope_head_dim
  q = project_q(p, x, cfg, dtype)
  q_nope, q_pe = q[..., :nope], L.apply_rope(q[..., nope:], cos, sin, cfg.rope_interleave)
  latent, k_pe = project_latent(p, x, cfg, dtype)
  k_pe = L.apply_rope(k_pe[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0]
  c = {"latent": L.cache_write(c["latent"], latent, layer, index),
       "k_pe": L.cache_write(c["k_pe"], k_pe, layer, index)}
  latent_S, k_pe_S = L.cache_read(c["latent"], layer, dtype), L.cache_read(c["k_pe"], layer, dtype)
  kv_b = p["kv_b"]
  if cfg.fp8:
    # the training forward runs kv_b as an FP8 GEMM: e4m3 latent in 1x128 tiles (per token,
    # so the rounded latent can be cached) and e4m3 weights in 128x128 blocks. The absorbed
    # form computes the same products from the same rounded operands (fp32 accumulation), so
    # the sampler is the policy the trainer scores.
    latent_S, kv_b = _fp8_round_activations(latent_S), _fp8_round_weights(kv_b)
  w_k, w_v = kv_b[..., :nope].astype(dtype), kv_b[..., nope:].astype(dtype)  # [R, H, .]
  q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_k, preferred_element_type=jnp.float32)
  # queries (t, h) flattened into one dim q: plain batched matmuls, 2x faster on XLA:CPU than
  # einsums that keep t and h apart (a decode step has t = 1 and few heads per row)
  B, t, H, R = q_lat.shape
  q_lat, q_pe = q_lat.astype(dtype).reshape(B, t * H, R), q_pe.reshape(B, t * H, -1)
  scores = (jnp.einsum("bqr,bsr->bqs", q_lat, latent_S, preferred_element_type=jnp.float32) +
            jnp.einsum("bqp,bsp->bqs", q_pe, k_pe_S, preferred_element_type=jnp.float32))
  scores = jnp.where(mask[:, 0, :, None, :], scores.reshape(B, t, H, -1) * L.softmax_scale(cfg),
                     L.NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(B, t * H, -1)
  out_lat = jnp.einsum("bqs,bsr->bqr", probs, latent_S,
                       preferred_element_type=jnp.float32).reshape(B, t, H, R)
  out = jnp.einsum("bthr,rhv->bthv", out_lat.astype(dtype), w_v,
                   preferred_element_type=jnp.float32).astype(dtype)
  # the output projection as in the training forward (mla.mla): heads and head_dim flattened
  # into one contraction, through layers.dense (an FP8 GEMM when cfg.fp8)
  y = L.dense(out.reshape(B, t, -1), p["o"].reshape(-1, p["o"].shape[-1]), dtype, cfg.fp8)
  return y.astype(dtype), c


def _fp8_round_activations(x):
  """x rounded as the FP8 GEMM rounds its activations: e4m3 in 1x128 tiles of the last dim."""
  from pallas_kernels import fp8
  return fp8.dequantize_activations(*fp8.quantize_activations(x)).astype(x.dtype)


def _fp8_round_weights(w):
  """w [R, *out] rounded as the FP8 GEMM rounds its weights: e4m3 in 128x128 blocks of the
  [R, prod(out)] matrix."""
  from pallas_kernels import fp8
  w2 = w.reshape(w.shape[0], -1)
  return fp8.dequantize_weights(*fp8.quantize_weights(w2)).astype(w.dtype).reshape(w.shape)
