"""Distil the tiny MoE teacher into a smaller dense Qwen2-style student (CPU).

    python -m r1jax.launch --config configs/distill_tiny.py

Stage 1 trains the teacher (cold-start SFT); stage 2 distils it into a fresh student with
logit-level forward KL on the same data; both are evaluated on held-out problems.
"""

import ml_collections

from r1jax.run_config import base_config, stage, tiny_moe_fields, tiny_student_fields


def get_config(arg=None):
  del arg
  c = base_config(**tiny_moe_fields())
  c.data.update(batch_size=32, seq_len=64, num_sft_examples=400, num_eval_problems=50)
  c.optim.update(lr=2e-3, warmup_steps=20)
  c.eval.update(k=0, max_new_tokens=40)
  c.stages.sft = stage("sft", steps=250)
  c.stages.distill = stage("distill", steps=250, mode="logit", divergence="forward_kl",
                           temperature=1.0, ce_weight=0.5,
                           student=ml_collections.ConfigDict(tiny_student_fields()))
  c.stage_order = ("sft", "distill")
  return c
