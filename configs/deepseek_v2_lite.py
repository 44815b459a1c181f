"""DeepSeek-V2-Lite (16B, 2.4B active): softmax routing, no q-LoRA, two shared experts.

    python -m r1jax.launch --config configs/deepseek_v2_lite.py --dry_run

On its 64 devices (fsdp 8 x expert 8; data takes any more) the dry run puts a step of 64 x 4096
tokens at 16.5 GiB per device: dropless all_to_all with buffers of 2x the mean load over the
fewest token slices that fit them (26.2 GiB with allgather, which gathers every token of the
expert group).
"""

import ml_collections

from r1jax.run_config import base_config, stage


def get_config(arg=None):
  del arg
  c = base_config(
      model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
      num_hidden_layers=27, num_attention_heads=16, rms_norm_eps=1e-6,
      max_position_embeddings=163840,
      # mla
      q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128,
      # moe
      n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
      first_k_dense_replace=1, n_group=1, topk_group=1, scoring_func="softmax",
      topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
      # yarn
      rope_theta=10000.0, rope_type="yarn", rope_factor=40.0,
      original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
      mscale_all_dim=0.707,
      # mtp
      num_nextn_predict_layers=0,
      moe_impl="ragged_dot", expert_dispatch="all_to_all", dropless_fast_factor=2.0,
      dtype="bfloat16", param_dtype="float32", remat="full", logits_chunk=1024)
  c.mesh.update(dict(data=-1, fsdp=8, expert=8, tensor=1))
  c.data.update(batch_size=64, seq_len=4096)  # one row per device at 64 devices
  c.stages.sft = stage("sft", steps=100)
  c.stage_order = ("sft",)
  return c
