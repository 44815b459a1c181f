"""The decoder block: one for every family and every mode.

    x, stats, cache = block.decoder_block(p, x, cos, sin, mask, cfg)              # train/score
    x, stats, cache = block.decoder_block(p, x, cos, sin, mask, cfg,
                                          cache=(c, layer, index))                # prefill/decode

Pre-norm: x + attention(norm(x)), then + FFN(norm(x)). The attention is `families.ATTENTION[cfg.attention]`;
the FFN is the MoE when the layer's params hold "moe", else the dense SwiGLU MLP.
"""

from __future__ import annotations

from r1jax.model import layers as L
from r1jax.model import moe as moe_lib
from r1jax.model.config import ModelConfig
from r1jax.model.families import ATTENTION


def decoder_block(p, x, cos, sin, mask, cfg: ModelConfig, *, cache=None, token_mask=None,
                  replay_ids=None, zigzag: bool = False):
  """One layer. cache: None (full-sequence attention), or (c, layer, index): the stack's cache
  {name: [L, B, S, ...]}, this layer's index in it and the slot of x's first token.
  zigzag: x's positions are in `layers.zigzag_slots` order (context parallelism).
  token_mask [B, T] (MoE): padding goes to no expert; replay_ids [B, T, k]: R3 routing.
  Returns (x, MoE stats or None for a dense FFN, the updated stack cache or None)."""
  attention = ATTENTION[cfg.attention]
  if cache is None:
    x = L.constrain_positions(x)  # context parallelism: each device its own positions
  h = L.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  if cache is None:
    y, c = attention.forward(p["attn"], h, cos, sin, mask, cfg, zigzag), None
  else:
    c, layer, index = cache
    y, c = attention.cached(p["attn"], h, cos, sin, mask, c, layer, index, cfg)
  x = x + y
  h = L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  if "moe" in p:
    y, stats = moe_lib.moe_block(p["moe"], h, cfg, token_mask, replay_ids,
                                 positions_split=cache is None)
  else:
    y, stats = L.swiglu_mlp(p["mlp"], h, cfg.jnp_dtype, cfg.fp8), None
  return x + y, stats, c
