"""The R1-Zero path on the tiny MoE (CPU): GRPO straight on a base model, no cold-start traces.

    python -m r1jax.launch --config configs/r1_zero_tiny.py

The base model comes from a short `pretrain` stage: plain next-token loss on problems and their
answers under the R1-Zero template, with no reasoning. 90% of those documents give the bare answer;
10% (`tagged_frac`) write it in the think/answer markup with the question restated inside <think>
(no worked steps), as a real base model has met such markup in its web data. Without them the
char-level base never emits a tag, every GRPO group scores 0 and nothing is learned. GRPO then
rewards accuracy and the <think>...</think><answer>...</answer> format; metrics.jsonl and
summary.json show whether the policy learns the format (reward_format) and how held-out accuracy
moves.
"""

from r1jax.run_config import base_config, stage, tiny_moe_fields


def get_config(arg=None):
  del arg
  c = base_config(**tiny_moe_fields())
  c.data.update(batch_size=32, seq_len=80, num_sft_examples=400, num_eval_problems=50,
                template="r1_zero_short")
  c.optim.update(lr=2e-3, warmup_steps=20)
  c.eval.update(k=0, max_new_tokens=40)
  c.stages.pretrain = stage("pretrain", steps=200, tagged_frac=0.1)
  c.stages.grpo = stage("grpo", steps=80, lr=2e-4, warmup_steps=0, schedule="constant",
                        prompts_per_step=16, group_size=8, max_new_tokens=40, temperature=1.0,
                        reward_weights={"accuracy": 1.0, "format": 0.5}, loss_type="dr_grpo",
                        advantage_scale="none", eps_low=0.2, eps_high=0.28, beta=0.0)
  c.stage_order = ("pretrain", "grpo")
  return c
