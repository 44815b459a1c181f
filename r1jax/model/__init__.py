"""Functional models: DeepSeek-V3 MoE (`deepseek`) and dense Qwen2/Llama students (`dense`).

    logits = model.forward(params, tokens, cfg)          # int32 [B, T] -> fp32 [B, T, V]
    logits, aux = model.forward_with_aux(params, tokens, cfg, mtp=True)
    params = model.init(cfg, jax.random.key(0))
"""

from __future__ import annotations

from r1jax.config import ModelConfig
from r1jax.model import dense, deepseek
from r1jax.model.params import abstract, declare, init, logical_axes


def forward_with_aux(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                     mtp: bool = False):
  """Logits [B, T, V] fp32 and aux: expert_counts [L_moe, E], balance (sequence-wise balance
  statistic summed over MoE layers), dropped (dropped expert assignments), and with mtp=True
  mtp_logits [D_mtp, B, T, V] where module k's position i predicts token i + k + 1.

  segment_ids [B, T] (packed sequences): attention never crosses segments, and positions
  restart at each segment start unless `positions` is given.
  """
  impl = deepseek if cfg.is_moe else dense
  return impl.forward_with_aux(params, tokens, cfg, segment_ids=segment_ids,
                               positions=positions, mtp=mtp)


def forward(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None):
  """Tokens int32 [B, T] -> float32 logits [B, T, V]."""
  return forward_with_aux(params, tokens, cfg, segment_ids=segment_ids, positions=positions)[0]


__all__ = ["forward", "forward_with_aux", "init", "abstract", "declare", "logical_axes",
           "ModelConfig"]
