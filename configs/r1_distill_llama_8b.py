"""R1-Distill-Llama-8B: SFT of Llama-3.1-8B on R1-generated reasoning traces.

    python -m r1jax.launch --config configs/r1_distill_llama_8b.py \
        --config.init_from=/path/to/Llama-3.1-8B \
        --config.data.tokenizer=/path/to/Llama-3.1-8B \
        --config.data.train_file=/path/to/r1_traces.jsonl \
        --config.data.eval_file=/path/to/math500.jsonl

The model fields are DeepSeek-R1-Distill-Llama-8B's config.json (Llama 3.1: GQA with 8 key-value
heads, untied embeddings, rope_theta 500,000 and Llama 3.1's rope scaling, `rope_type="llama3"`,
factor 8 over an original 8,192-token context). `--config.init_from` reads the same fields from
the checkpoint. The recipe is r1_distill_qwen_1p5b.py's (this config builds on it): plain SFT
on the teacher's traces, rows of 16,384 tokens packed, one per device; the batch of 64 rows is
sized for 64 devices (fsdp 64: every parameter, gradient and AdamW moment split 64 ways). `--dry_run
--dry_run_devices=64` puts that at 17.7 GiB per device (0.5 parameters, 0.7 AdamW moments,
16.6 temporaries), so 80 GB GPUs have room for longer rows or more of them.
"""

from r1jax.model.config import model_section
from r1jax.run_config import from_file


def get_config(arg=None):
  del arg
  c = from_file("r1_distill_qwen_1p5b.py", relative_to=__file__)  # the same SFT recipe
  c.model = model_section(
      model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
      max_position_embeddings=131072, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
      original_max_position_embeddings=8192, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
      bos_token_id=128000, eos_token_id=128001, dtype="bfloat16", param_dtype="float32",
      remat="full", logits_chunk=1024, attn_chunk=2048, attn_key_chunk=2048)
  c.mesh.update(fsdp=64)
  return c
