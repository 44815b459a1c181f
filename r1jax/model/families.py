"""The one table of model families' parts. An attention family is a module that provides:

  declare(cfg)        its parameters in one layer (ParamSpec leaves)
  hf_entries(cfg)     their HF tensor names
  forward(...)        full-sequence attention (training, scoring, prefill without a cache)
  cached(...)         attention on the KV cache (prefill and decode)
  cache_shapes(cfg)   what the cache holds per token

`ModelConfig.attention` ("mla" | "gqa", derived from model_type) picks the entry; `params`,
`hf`, `block` and `decoder` dispatch through this table only. The FFN is the dense SwiGLU or the
MoE package, per layer (`ModelConfig.layer_is_moe`).
"""

from __future__ import annotations

import types

from r1jax.model import gqa, mla

ATTENTION = {
    "mla": types.SimpleNamespace(declare=mla.declare, hf_entries=mla.hf_entries,
                                 forward=mla.mla, cached=mla.mla_cached,
                                 cache_shapes=mla.cache_shapes),
    "gqa": types.SimpleNamespace(declare=gqa.declare, hf_entries=gqa.hf_entries,
                                 forward=gqa.gqa, cached=gqa.gqa_cached,
                                 cache_shapes=gqa.cache_shapes),
}
