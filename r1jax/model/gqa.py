"""Grouped-query attention: the attention family of Qwen2, Qwen3, Llama and Qwen3-MoE. Optional
q/k/v bias (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), rotate-half RoPE.

`gqa` is the full-sequence form (training, scoring); `gqa_cached` runs on the KV cache;
`cache_shapes` is what the cache holds per token (rotated k and v)."""

from __future__ import annotations

from r1jax.model.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model.spec import ParamSpec


def declare(cfg: ModelConfig) -> dict:
  """The attention parameters of one layer (`params` stacks them)."""
  D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.dense_head_dim
  attn = {"q": ParamSpec((D, H, hd), ("embed", "heads", "head_dim")),
          "k": ParamSpec((D, KV, hd), ("embed", "kv_heads", "head_dim")),
          "v": ParamSpec((D, KV, hd), ("embed", "kv_heads", "head_dim")),
          "o": ParamSpec((H, hd, D), ("heads", "head_dim", "embed"))}
  if cfg.attention_bias:
    attn["q_bias"] = ParamSpec((H, hd), ("heads", "head_dim"), "zeros")
    attn["k_bias"] = ParamSpec((KV, hd), ("kv_heads", "head_dim"), "zeros")
    attn["v_bias"] = ParamSpec((KV, hd), ("kv_heads", "head_dim"), "zeros")
  if cfg.qk_norm:
    attn["q_norm"] = ParamSpec((hd,), ("norm",), "ones")
    attn["k_norm"] = ParamSpec((hd,), ("norm",), "ones")
  return attn


def hf_entries(cfg: ModelConfig):
  """(path under the layer, HF key under `model.layers.{i}.`, input dims of a linear) per tensor."""
  for n in ("q", "k", "v"):
    yield ("attn", n), f"self_attn.{n}_proj.weight", 1
    if cfg.attention_bias:
      yield ("attn", f"{n}_bias"), f"self_attn.{n}_proj.bias", 0
  if cfg.qk_norm:
    yield ("attn", "q_norm"), "self_attn.q_norm.weight", 0
    yield ("attn", "k_norm"), "self_attn.k_norm.weight", 0
  yield ("attn", "o"), "self_attn.o_proj.weight", 2


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


def gqa(p, x, cos, sin, mask, cfg: ModelConfig, zigzag: bool = False):
  """Grouped-query self-attention of x [B, T, D] (the training and prefill forward); zigzag: the
  positions are in `layers.zigzag_slots` order (context parallelism)."""
  q, k, v = qkv(p, x, cos, sin, cfg)
  out = L.attend(q, k, v, mask, L.softmax_scale(cfg), cfg.attn_chunk, cfg.attn_impl,
                 cfg.attn_key_chunk, causal=True, zigzag=zigzag)
  return out_proj(p, out, cfg.jnp_dtype, cfg.fp8)


def cache_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  return {"k": (cfg.kv_heads, cfg.dense_head_dim), "v": (cfg.kv_heads, cfg.dense_head_dim)}


def gqa_cached(p, x, cos, sin, mask, c, layer, index, cfg: ModelConfig):
  """Dense GQA of layer `layer`. x [B, t, D]; c = the stack's {k, v [L, B, S, K, d]};
  mask [B, 1, t, S]."""
  q, k, v = qkv(p, x, cos, sin, cfg)
  c = {"k": L.cache_write(c["k"], k, layer, index), "v": L.cache_write(c["v"], v, layer, index)}
  dtype = cfg.jnp_dtype
  out = L.attend(q, L.cache_read(c["k"], layer, dtype), L.cache_read(c["v"], layer, dtype), mask,
                 L.softmax_scale(cfg))
  return out_proj(p, out, dtype, cfg.fp8), c
