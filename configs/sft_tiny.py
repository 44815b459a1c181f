"""Cold-start SFT of the tiny MoE on the arithmetic chain-of-thought task (CPU, minutes).

    python -m r1jax.launch --config configs/sft_tiny.py

Trains on traces of 1-2 digit additions; summary.json reports held-out greedy accuracy on
covered (1-2 digit) and uncovered (3 digit) problems.
"""

from r1jax.run_config import base_config, stage, tiny_moe_fields


def get_config(arg=None):
  del arg
  c = base_config(**tiny_moe_fields())
  c.data.update(batch_size=32, seq_len=64, num_sft_examples=400, num_eval_problems=50)
  c.optim.update(lr=2e-3, warmup_steps=20)
  c.train.update(mtp_weight=0.1)
  c.eval.update(k=0, max_new_tokens=40)
  c.stages.sft = stage("sft", steps=250)
  c.stage_order = ("sft",)
  c.checkpoint.every_steps = 50
  return c
