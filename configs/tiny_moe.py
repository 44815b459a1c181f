"""Tiny DeepSeek-V3-style MoE for CPU experiments and tests (~1M parameters).

Every V3 mechanism is on: q-LoRA MLA with interleaved YaRN RoPE, a dense first layer, sigmoid
routing with correction bias and group-limited top-k (n_group > 1), a shared expert, MTP depth 1.

    python -m r1jax.launch --config configs/tiny_moe.py --dry_run
"""

import ml_collections

from r1jax.run_config import base_config, stage


def get_config(arg=None):
  del arg
  c = base_config(
      model_type="deepseek_v3", vocab_size=128, hidden_size=128, intermediate_size=256,
      num_hidden_layers=4, num_attention_heads=4,
      # mla
      q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      # moe
      n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=64,
      first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
      # yarn
      max_position_embeddings=1024, original_max_position_embeddings=256, rope_factor=4.0,
      # mtp
      num_nextn_predict_layers=1,
      moe_impl="capacity", capacity_factor=None,  # dropless; the fast path on CPU
      dtype="float32", param_dtype="float32")
  c.mesh.update(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.stages.sft = stage("sft", steps=100)
  c.stage_order = ("sft",)
  return c
