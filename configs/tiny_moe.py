"""Tiny DeepSeek-V3-style MoE for CPU experiments and tests (~2M parameters).

Every V3 mechanism is on: q-LoRA MLA with interleaved YaRN RoPE, a dense first layer, sigmoid
routing with correction bias and group-limited top-k (n_group > 1), a shared expert, MTP depth 1.

    python -m r1jax.launch --config configs/tiny_moe.py --dry_run
"""

from r1jax.run_config import base_config, stage, tiny_moe_fields


def get_config(arg=None):
  del arg
  c = base_config(**tiny_moe_fields())
  c.stages.sft = stage("sft", steps=100)
  c.stage_order = ("sft",)
  return c
