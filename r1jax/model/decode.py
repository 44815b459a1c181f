"""Cache-aware forward for generation: one function serves prefill (t = prompt length) and decode
(t = 1).

    cache = decode.init_cache(cfg, batch, max_len)
    logits, cache = decode.forward_cached(params, tokens, positions, cache, index, kv_valid, cfg)

The t new tokens are written at cache slots [index, index + t) (the same for every row) and
attend over slots [0, index + t). Rows are left-padded: slot s of a row holds a real token iff
`kv_valid[b, s]`. Causality is by slot (a query at slot index + j sees slots <= index + j), which
equals causality by position because positions grow with the slot inside a row's valid span.

Caches are stacked like the layer params, {stack: {name: [L, B, S, ...]}}, and run under
`lax.scan` with the whole stack in the carry: each layer writes its new entries in place. (A cache
passed as scan xs/ys would be sliced out and restacked, i.e. copied, on every decode step.)
Per layer:
- MLA (DeepSeek), the absorbed form: the normed latent [B, S, kv_lora_rank] and the rotated
  shared rope key k_pe [B, S, qk_rope_head_dim] (512 + 64 = 576 values per token at V3 size).
  kv_b's key half is folded into the query (q_nope @ W_k^T lives in latent space) and its value
  half is applied after attention, so per-head keys and values are never materialized.
- GQA (Qwen2/Qwen3/Llama, Qwen3-MoE): rotated k and v [B, S, kv_heads, head_dim].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model import mla as mla_lib
from r1jax.model import moe as moe_lib
from r1jax.model.deepseek import run_slice
from r1jax.model.dense import out_proj, qkv
from r1jax.model.layers import embed, head


def _stacks(cfg: ModelConfig) -> dict[str, int]:
  """Layer stacks of the param tree and their depths (the cache mirrors them)."""
  if not cfg.is_moe:
    return {"layers": cfg.num_hidden_layers}
  stacks = {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}
  return {k: n for k, n in stacks.items() if n}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Zeroed cache, {stack: {name: [L, B, S, ...]}}; dtype defaults to the compute dtype."""
  dtype = jnp.dtype(dtype or cfg.jnp_dtype)
  if cfg.attention == "mla":
    per_token = {"latent": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)}
  else:
    per_token = {"k": (cfg.kv_heads, cfg.dense_head_dim), "v": (cfg.kv_heads, cfg.dense_head_dim)}
  return {stack: {name: jnp.zeros((n, batch, max_len, *shape), dtype)
                  for name, shape in per_token.items()}
          for stack, n in _stacks(cfg).items()}


def _write(cache_LBS, new_Bt, layer, index):
  """Write new entries [B, t, ...] at layer `layer`, slot `index` of a stacked cache
  [L, B, S, ...], in place."""
  start = (layer, 0, index) + (0,) * (cache_LBS.ndim - 3)
  return jax.lax.dynamic_update_slice(cache_LBS, new_Bt[None].astype(cache_LBS.dtype), start)


def _read(cache_LBS, layer, dtype):
  """Layer `layer` of a stacked cache, [B, S, ...] in `dtype`."""
  return jax.lax.dynamic_index_in_dim(cache_LBS, layer, keepdims=False).astype(dtype)


def mla_cached(p, x, cos, sin, mask, c, layer, index, cfg: ModelConfig):
  """Absorbed MLA of layer `layer`. x [B, t, D]; c = the stack's {latent [L, B, S, R],
  k_pe [L, B, S, r]}; mask [B, 1, t, S]."""
  dtype = cfg.jnp_dtype
  nope = cfg.qk_nope_head_dim
  q = mla_lib.project_q(p, x, cfg, dtype)
  q_nope, q_pe = q[..., :nope], L.apply_rope(q[..., nope:], cos, sin, cfg.rope_interleave)
  latent, k_pe = mla_lib.project_latent(p, x, cfg, dtype)
  k_pe = L.apply_rope(k_pe[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0]
  c = {"latent": _write(c["latent"], latent, layer, index),
       "k_pe": _write(c["k_pe"], k_pe, layer, index)}
  latent_S, k_pe_S = _read(c["latent"], layer, dtype), _read(c["k_pe"], layer, dtype)
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


def gqa_cached(p, x, cos, sin, mask, c, layer, index, cfg: ModelConfig):
  """Dense GQA of layer `layer`. x [B, t, D]; c = the stack's {k, v [L, B, S, K, d]};
  mask [B, 1, t, S]."""
  q, k, v = qkv(p, x, cos, sin, cfg)
  c = {"k": _write(c["k"], k, layer, index), "v": _write(c["v"], v, layer, index)}
  dtype = cfg.jnp_dtype
  out = L.attend(q, _read(c["k"], layer, dtype), _read(c["v"], layer, dtype), mask,
                 L.softmax_scale(cfg))
  return out_proj(p, out, dtype, cfg.fp8), c


def decoder_layer_cached(p, x, cos, sin, mask, c, layer, index, cfg: ModelConfig,
                         token_mask=None):
  """Pre-norm block with cached attention (layer `layer` of the stacked cache `c`); the FFN is
  the dense MLP or the MoE (padding routed to no expert). Returns (x, cache, expert ids
  [B, t, k] of a MoE layer, else None)."""
  dtype = cfg.jnp_dtype
  attn = mla_cached if cfg.attention == "mla" else gqa_cached
  h = L.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  y, c = attn(p["attn"], h, cos, sin, mask, c, layer, index, cfg)
  x = x + y
  h = L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  ids = None
  if "moe" in p:
    y, stats = moe_lib.moe_block(p["moe"], h, cfg, token_mask)
    ids = stats["ids"]
  else:
    y = L.swiglu_mlp(p["mlp"], h, dtype, cfg.fp8)
  return x + y, c, ids


def forward_cached(params, tokens, positions, cache, index, kv_valid, cfg: ModelConfig):
  """Logits [B, t, V] fp32 of `tokens` [B, t] at `positions` [B, t], the updated cache, and
  the expert ids each MoE layer chose, [L_moe, B, t, k] (None for a dense model).

  index: int scalar (may be traced), the cache slot of tokens[:, 0] for every row.
  kv_valid: bool [B, S], which cache slots hold real tokens, or int pad lengths [B] (slots
  [0, pad) of each row are left padding).
  """
  B, t = tokens.shape
  S = jax.tree.leaves(cache)[0].shape[2]
  slots = jnp.arange(S, dtype=jnp.int32)
  if kv_valid.ndim == 1:
    kv_valid = slots[None, :] >= kv_valid[:, None]
  query_slot = index + jnp.arange(t, dtype=jnp.int32)
  causal = slots[None, :] <= query_slot[:, None]  # [t, S]; also hides slots >= index + t
  mask = (kv_valid[:, None, :] & causal[None])[:, None]  # [B, 1, t, S]
  token_mask = jnp.take(kv_valid, jnp.minimum(query_slot, S - 1), axis=1)  # [B, t] real tokens
  cos, sin = L.rope_cos_sin(cfg, positions)
  x = embed(params, tokens, cfg)
  cache, moe_ids = dict(cache), []
  for stack, start, count in cfg.layer_runs:  # the layers in order, run by run
    def body(carry, layer_in):
      (x, c), (p, layer) = carry, layer_in
      x, c, ids = decoder_layer_cached(p, x, cos, sin, mask, c, layer, index, cfg, token_mask)
      return (x, c), ids
    (x, cache[stack]), ids = jax.lax.scan(
        body, (x, cache[stack]),
        (run_slice(params[stack], start, count), start + jnp.arange(count)))
    if stack == "moe_layers":
      moe_ids.append(ids)
  expert_ids = jnp.concatenate(moe_ids, axis=0) if moe_ids else None
  logits = head(params, L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cfg)
  return logits, cache, expert_ids
