"""Qwen3-30B-A3B (MoE: 128 experts, top-8, 3.3B active; GQA 32/4 with q/k RMSNorm), HF field names.

    python -m r1jax.launch --config configs/qwen3_30b_a3b.py --dry_run
    python -m r1jax.launch --config configs/qwen3_30b_a3b.py --config.init_from=/path/to/Qwen3-30B-A3B \
        --config.data.tokenizer=/path/to/Qwen3-30B-A3B ...

The fields are Qwen3-30B-A3B's config.json; with `init_from` its own config.json is what loads.
The default mesh is 32 devices: experts over 8, FSDP over 4. SFT at 64 x 4096 tokens in
bfloat16 with full rematerialization, dropless as in transformers (all_to_all buffers of 2x the
mean load, over the fewest token slices whose every slice fits them): the dry run reports
28.7 GiB per device (benchmarks/results/dry_runs.txt; 24.8 GiB when it dropped past capacity
1.25).
"""

from r1jax.run_config import base_config, stage

QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    n_routed_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643,
    eos_token_id=151645)


def get_config(arg=None):
  del arg
  c = base_config(**QWEN3_30B_A3B, dtype="bfloat16", param_dtype="float32", remat="full",
                  attn_chunk=512, attn_key_chunk=512, logits_chunk=512, moe_impl="ragged_dot",
                  expert_dispatch="all_to_all", capacity_factor=None, dropless_fast_factor=2.0)
  c.mesh.update(dict(data=1, fsdp=4, expert=8, tensor=1))
  c.data.update(batch_size=64, seq_len=4096)
  c.optim.update(lr=1e-5, mu_dtype="bfloat16")
  c.stages.sft = stage("sft", steps=100)
  c.stage_order = ("sft",)
  return c
