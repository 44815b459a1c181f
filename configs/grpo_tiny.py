"""GRPO on the tiny MoE after a cold-start SFT (CPU): accuracy + format rule rewards.

    python -m r1jax.launch --config configs/grpo_tiny.py

The cold-start traces cover 1-2 digit additions; GRPO prompts (answers only, no traces) mix in
3-digit problems, and the held-out evaluation reports both buckets.
"""

from r1jax.run_config import base_config, stage, tiny_moe_fields


def get_config(arg=None):
  del arg
  c = base_config(**tiny_moe_fields())
  c.data.update(batch_size=32, seq_len=64, num_sft_examples=400, num_eval_problems=50)
  c.optim.update(lr=2e-3, warmup_steps=20)
  c.eval.update(k=0, max_new_tokens=40)
  c.stages.sft = stage("sft", steps=250)
  c.stages.grpo = stage("grpo", steps=60, lr=1e-4, warmup_steps=0, schedule="constant",
                        prompts_per_step=16, group_size=8, max_new_tokens=40, temperature=1.0,
                        reward_weights={"accuracy": 1.0, "format": 0.2}, loss_type="grpo",
                        eps_low=0.2, eps_high=0.2, beta=0.0, mu=1, ref_refresh_every=0,
                        advantage_scale="group", dynamic_sampling=False, max_refills=2,
                        mask_truncated=False, top_p=1.0)
  c.stage_order = ("sft", "grpo")
  return c
