"""Qwen3-0.6B (dense: GQA 16/8 with q/k RMSNorm, head_dim 128, tied embeddings), HF field names.

    python -m r1jax.launch --config configs/qwen3_0p6b.py --dry_run
    python -m r1jax.launch --config configs/qwen3_0p6b.py --config.init_from=/path/to/Qwen3-0.6B \
        --config.data.tokenizer=/path/to/Qwen3-0.6B --config.mesh.fsdp=8 ...

The fields are Qwen3-0.6B's config.json. With `init_from` a local HF dir of the model, its own
config.json is what loads (`hf.load`; these fields then only size the dry run). Without it the
model starts from random weights. SFT at 16 x 4096 tokens in bfloat16 with full rematerialization,
data-parallel over every device (the dry run simulates 8: 14.0 GiB per device, as the README
quotes).
"""

from r1jax.run_config import base_config, stage

QWEN3_0P6B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=40960, tie_word_embeddings=True,
                  bos_token_id=151643, eos_token_id=151645)


def get_config(arg=None):
  del arg
  c = base_config(**QWEN3_0P6B, dtype="bfloat16", param_dtype="float32", remat="full",
                  attn_chunk=512, attn_key_chunk=512, logits_chunk=512)
  c.data.update(batch_size=16, seq_len=4096)
  c.optim.update(lr=1e-5)
  c.stages.sft = stage("sft", steps=100)
  c.stage_order = ("sft",)
  return c
