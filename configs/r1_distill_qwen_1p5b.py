"""R1-Distill-Qwen-1.5B: SFT of a Qwen2.5-1.5B base on R1-generated reasoning traces.

    python -m r1jax.launch --config configs/r1_distill_qwen_1p5b.py \
        --config.init_from=/path/to/Qwen2.5-Math-1.5B \
        --config.data.tokenizer=/path/to/Qwen2.5-Math-1.5B \
        --config.data.train_file=/path/to/r1_traces.jsonl \
        --config.data.eval_file=/path/to/math500.jsonl

R1 distils by plain SFT (no RL on students) on ~800k samples for 2 epochs; the JSONL records hold
`question`, `completion` (the teacher's reasoning + answer) and `answer`.

The batch, 64 rows of 16,384 tokens, is sized for 64 devices (fsdp 8 x data 8: one row each).
`--dry_run --dry_run_devices=64` puts that at 10.3 GiB per device. On 8 devices, add
`--config.train.accum_steps=8` (one row per device per micro-batch; 11.2 GiB in the dry run).
Without it, 8 devices would each hold 8 rows: 55.5 GiB. (Before the training forward pinned its
activations' rows to the batch axes, c5bbeaa: 36.4, 42.2 and 268.7 GiB.)
"""

from r1jax.run_config import base_config, stage


def get_config(arg=None):
  del arg
  c = base_config(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                  intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0,
                  tie_word_embeddings=False, rms_norm_eps=1e-6, dtype="bfloat16",
                  param_dtype="float32", remat="full", logits_chunk=1024,
                  # 2k queries at a time over 2k-key blocks: [H, 2k, 2k] scores, not
                  # [H, 16k, 16k], and the blocks past each chunk's queries skipped
                  attn_chunk=2048, attn_key_chunk=2048)
  c.mesh.update(data=-1, fsdp=8, expert=1, tensor=1)
  c.data.update(task="file", batch_size=64, seq_len=16384, template="r1", pack=True)
  c.optim.update(lr=5e-5, warmup_steps=100, schedule="cosine", weight_decay=0.0,
                 mu_dtype="bfloat16")
  c.eval.update(k=16, temperature=0.6, top_p=0.95, max_new_tokens=32768, greedy=False)
  c.stages.sft = stage("sft", steps=25000)
  c.stage_order = ("sft",)
  return c
