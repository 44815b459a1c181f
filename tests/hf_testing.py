"""Helpers for the HF parity tests: tiny random transformers checkpoints and logits on both sides.

Weights get a meaningful scale (std 0.1 matrices, 1 + 0.1*randn norms) so a wrong transpose,
a missed bias or a wrong rope layout moves the logits far beyond the 1e-4 tolerance.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
import transformers

from r1jax import model
import testing

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _rope(hf_kw: dict, rope: dict | None, theta: float):
  """Put rope settings under the spelling this transformers version reads."""
  rope = dict(rope or {"rope_type": "default"})
  if TRANSFORMERS_5:
    hf_kw["rope_parameters"] = dict(rope, rope_theta=theta)
  else:
    hf_kw["rope_theta"] = theta
    hf_kw["rope_scaling"] = None if rope["rope_type"] == "default" else dict(rope, type=rope["rope_type"])
  return hf_kw


def deepseek_config(*, rope=None, rope_theta=10000.0, **kw):
  """A tiny DeepseekV3Config; `kw` overrides the small defaults below."""
  base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
              topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
              routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False)
  base.update(kw)
  return transformers.DeepseekV3Config(**_rope(base, rope, rope_theta))


def deepseek_v2_config(*, rope=None, rope_theta=10000.0, **kw):
  """A tiny DeepseekV2Config (softmax greedy routing, no correction bias); n_group left at
  transformers' default (None)."""
  base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
              first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)
  base.update(kw)
  return transformers.DeepseekV2Config(**_rope(base, rope, rope_theta))


def qwen2_config(**kw):
  base = dict(vocab_size=144, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)
  base.update(kw)
  return transformers.Qwen2Config(**_rope(base, None, 1e6))


def llama_config(*, rope=None, rope_theta=10000.0, **kw):
  """A tiny LlamaConfig (GQA, no biases), rope settings as in `deepseek_config`."""
  base = dict(vocab_size=144, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
  base.update(kw)
  return transformers.LlamaConfig(**_rope(base, rope, rope_theta))


def qwen3_config(**kw):
  """A tiny Qwen3Config: GQA with per-head q/k RMSNorm, no q/k/v bias, head_dim explicit (and
  different from hidden_size / num_attention_heads, as in the real Qwen3 models)."""
  base = dict(vocab_size=144, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
              use_sliding_window=False)
  base.update(kw)
  return transformers.Qwen3Config(**_rope(base, None, 1e6))


def qwen3_moe_config(**kw):
  """A tiny Qwen3MoeConfig: Qwen3's attention with a softmax top-k MoE in the layers that
  decoder_sparse_step and mlp_only_layers select, dense MLPs in the others."""
  base = dict(vocab_size=144, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
              mlp_only_layers=[], max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False, use_sliding_window=False)
  base.update(kw)
  return transformers.Qwen3MoeConfig(**_rope(base, None, 1e6))


@torch.no_grad()
def randomize_(hf_model, seed: int, bias_scale: float = 0.0, bias_offset: float = 0.0):
  """Re-draw every parameter: norms 1 + 0.1*randn, everything else 0.1*randn. Router
  correction biases get uniform [bias_offset, bias_offset + bias_scale) values (0, 0 keeps
  them zero)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in hf_model.named_parameters():
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if name.endswith("norm.weight"):
      p.copy_(1.0 + 0.1 * noise)
    else:
      p.copy_(0.1 * noise)
  for name, b in hf_model.named_buffers():
    if name.endswith("e_score_correction_bias"):
      b.copy_(bias_offset + bias_scale * torch.rand(b.shape, generator=g, dtype=torch.float32))
  return hf_model


def make_model(hf_config, seed: int = 0, bias_scale: float = 0.0, bias_offset: float = 0.0):
  """A random float32 transformers causal LM in eval mode."""
  transformers.set_seed(seed)
  config = hf_config
  config._attn_implementation = "eager"
  m = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  return randomize_(m, seed, bias_scale, bias_offset).eval()


def save_model(hf_model, path) -> str:
  hf_model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


@torch.no_grad()
def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
  out = hf_model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


@functools.lru_cache(maxsize=64)
def _compiled_forward(cfg, tokens_shape, packed: bool):
  fn = functools.partial(model.forward_with_aux, cfg=cfg)
  tokens = jax.ShapeDtypeStruct(tokens_shape, jax.numpy.int32)
  args = (model.abstract(cfg), tokens) + ((tokens,) if packed else ())
  if packed:
    fn = lambda p, t, s, fn=fn: fn(p, t, segment_ids=s)
  return testing.jit(fn).lower(*args).compile()


def our_logits_aux(cfg, params, tokens, segment_ids=None):
  """(fp32 logits [B, T, V] as numpy, aux) of r1jax's forward."""
  tokens = np.asarray(tokens, np.int32)
  run = _compiled_forward(cfg, tokens.shape, segment_ids is not None)
  args = (params, tokens) + (() if segment_ids is None else (np.asarray(segment_ids, np.int32),))
  logits, aux = run(*args)
  return np.asarray(logits), aux


def our_logits(cfg, params, tokens, segment_ids=None) -> np.ndarray:
  return our_logits_aux(cfg, params, tokens, segment_ids)[0]


def random_tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
