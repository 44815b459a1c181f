"""DeepSeek-V3 / R1 671B (37B active) with the published architecture (HF field names).

    python -m r1jax.launch --config configs/deepseek_v3_671b.py --dry_run
    python -m r1jax.launch --config configs/deepseek_v3_671b.py --config.mesh.expert=64 ...

The default mesh is 256 devices: experts over 64, FSDP over 4 (override mesh.* for your slice).
The MoE drops no assignment, as DeepSeek-V3 trained: dropless all_to_all whose buffers hold 2x
the mean load, over the fewest token slices whose every slice fits them
(model/moe/dispatch.py `_dropless`). Its dry run reports 67.6 GiB per device (the README's
table; benchmarks/results/dry_runs.txt): full fine-tuning fits 256 H200s (141 GB = 131 GiB);
--config.mesh.fsdp=8 --config.data.batch_size=512 on 512 devices, 50.0 GiB. A GRPO update of
512 x 1,535 tokens on 256 devices needs 76.8 GiB, and its rollout 53.0
(benchmarks/dry_run_v3_grpo.py). 32k-token rows on 256 devices, with context parallelism:
--config.data.seq_len=32768 --config.model.attn_key_chunk=1024 --config.mesh.fsdp=2
--config.mesh.context=2 --config.data.batch_size=128, 100.4 GiB.
On GPU/TPU, --config.model.expert_dispatch=ragged_all_to_all sends only the routed rows.
"""

import ml_collections

from r1jax.run_config import base_config, stage


def get_config(arg=None):
  del arg
  c = base_config(
      model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
      num_hidden_layers=61, num_attention_heads=128, rms_norm_eps=1e-6,
      max_position_embeddings=163840,
      # mla
      q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128,
      # moe
      n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
      first_k_dense_replace=3, n_group=8, topk_group=4, scoring_func="sigmoid",
      topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
      # yarn
      rope_theta=10000.0, rope_type="yarn", rope_factor=40.0,
      original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
      mscale_all_dim=1.0,
      # mtp
      num_nextn_predict_layers=1,
      moe_impl="ragged_dot", capacity_factor=None, dropless_fast_factor=2.0,
      dropless_max_tokens=4096,  # longer rows exchange in slices of 4096 tokens per device
      expert_dispatch="all_to_all",
      dtype="bfloat16", param_dtype="float32", remat="full", attn_chunk=512,
      attn_key_chunk=512,  # causal: the key blocks after each query chunk are skipped
      logits_chunk=1024)
  c.mesh.update(dict(data=1, fsdp=4, expert=64, tensor=1))
  c.data.update(batch_size=256, seq_len=4096, tokenizer="deepseek-ai/DeepSeek-R1")
  c.optim.update(lr=3e-6, mu_dtype="bfloat16")
  c.train.update(mtp_weight=0.1)
  c.stages.sft = stage("sft", steps=100)
  c.stage_order = ("sft",)
  return c
