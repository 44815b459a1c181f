"""The whole DeepSeek-R1 recipe on a tiny MoE, on a CPU, in minutes (the README's main job).

    python -m r1jax.launch --config configs/r1_tiny.py

Task: integer addition with a digit-by-digit chain of thought in <think>, the result in
<answer>. Two kinds of problems:
  covered    a one-digit number plus a one- or two-digit one (7+45): 400 traced problems
  uncovered  two two-digit numbers (23+45): the cold start sees only 60 traced problems of
             this kind, and solves a quarter to two thirds of the held-out ones greedily,
             depending on the seed (tuned seeds 4, 6, 13, 19: 0.28-0.69); GRPO gets 1500 fresh
             ones with answers only (three quarters of its 2000 prompts). With 120 traces the
             cold start solved 0.72-0.85 and left GRPO too little headroom (README)
Every traced problem is written both ways (7+45 and 45+7, `data.trace_both_orders`): the same
problems, twice the cold-start sequences; without it the cold start generalized much worse on
some seeds (README).
Every held-out problem (50 of each kind, and 400 more uncovered ones drawn after every other
split: `data.num_heldout_uncovered`) is disjoint from the traces and the RL prompts up to
operand order, and each split is a uniform random subset of its kind's problems, so the held-out
problems look like the training ones (the covered kind has 955 problems; the splits use 950).
The cold start never generalizes to an untraced kind of problem at this size (two-digit +
two-digit with no traces: 0 of 64 at pass@16, measured), so "uncovered" is a kind the traces
show rarely rather than never.

Stages (each evaluated on the same held-out problems):
  cold_start      SFT on the 460 traced problems, each in both operand orders, 400 steps: close
                  to convergence, so that more SFT on the same traces (the control) has little
                  left to give; at 200 steps the control beat GRPO (README)
  grpo            300 GRPO steps, 32 prompts x 8 samples, with accuracy + format rewards on
                  answer-only prompts, completions capped at 32 tokens (a correct one takes at
                  most 24 with its end token; longer ones are runaways). 60 traces and 300 steps
                  were chosen on the tuned seeds 4, 6, 13 and 19 (docs/results/grpo_knob_probe/).
                  A k3 KL term to the cold start (beta=0.04, DeepSeekMath's value): without it
                  GRPO lowered the covered problems on four of the five 9bd5601 seeds
                  (docs/results/kl_probe/, tuned seeds 24 and 25). The update leaves out the
                  groups whose samples all got the same reward (`drop_zero_var`: their advantage
                  is zero; 79-92 % of the groups in the d3aa4cf round), and its batch ends after the
                  longest completion, rounded up to 8 tokens (`length_bucket`). With them the
                  update costs a fraction of what it did, so the step samples 32 prompts instead
                  of 16, and the matched control shrinks with it. On the tuned seeds 31 and 33,
                  from their d3aa4cf cold starts, GRPO raised the held-out problems to
                  0.84 / 0.91 (0.79 / 0.80 without; docs/results/drop_zero_var_probe/)
  sft_control     control branch: more cold-start SFT for the model FLOPs `grpo` spent
                  (generation + updates), starting from `cold_start`; the recipe continues
                  from `grpo`
  rejection       sample 4 answers for each of 1000 RL prompts, keep one correct + well-formed
                  answer per prompt
  sft_rs          SFT on the rejection-sampled data
  grpo_final      GRPO again (all-scenario RL reduced to the same rule rewards), 20 steps
                  with a 10-step lr warm-up and a KL term to sft_rs: without them it lowered the
                  held-out problems on every 9bd5601 seed (kl_probe: about neutral with them)
  distill         a dense Qwen2-style student trained from scratch for 500 steps (at 400 the
                  d3aa4cf round's seed 32 reached 89 % of its teacher, and 101 % at 500;
                  docs/results/distill_probe/) on the rejection-sampled data
                  plus the cold-start traces (R1 distils by plain SFT on its curated SFT set:
                  rejection-sampled reasoning plus the earlier SFT data)
"""

import ml_collections

from r1jax.run_config import base_config, stage, tiny_moe_fields, tiny_student_fields


def get_config(arg=None):
  del arg
  c = base_config(**tiny_moe_fields())
  c.data.update(batch_size=32, seq_len=64, num_sft_examples=400, num_rl_prompts=2000,
                num_eval_problems=50, covered_digits=(1, 2), covered_long_operands=1,
                uncovered_digits=(2, 2), uncovered_operands=2, uncovered_traces=60,
                trace_both_orders=True, rl_uncovered_frac=0.75, num_heldout_uncovered=400)
  c.optim.update(lr=2e-3, warmup_steps=20)
  c.train.update(mtp_weight=0.1)
  c.eval.update(k=4, temperature=1.0, top_p=1.0, max_new_tokens=40)
  c.checkpoint.every_steps = 50
  c.log.every_steps = 1  # per-step GRPO records for the per-bucket reward curves
  grpo = dict(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0,
              prompts_per_step=32, group_size=8, max_new_tokens=32, temperature=1.0,
              reward_weights={"accuracy": 1.0, "format": 0.2}, loss_type="grpo", eps_low=0.2,
              eps_high=0.2, beta=0.04, mu=1, ref_refresh_every=0, advantage_scale="group",
              dynamic_sampling=False, max_refills=1, mask_truncated=False, top_p=1.0,
              length_bucket=8, drop_zero_var=True,
              draft="",  # "mtp": speculative rollouts, the MTP module drafting (README)
              draft_weight=0.0,  # > 0: train the MTP draft on the rollouts (README)
              partial_tokens=0)  # > 0: partial rollouts of this many tokens per call (README)
  c.stages.cold_start = stage("sft", steps=400)
  c.stages.grpo = stage("grpo", steps=300, **grpo)
  c.stages.sft_control = stage("sft", steps=0, start_from="cold_start", branch=True,
                               match_compute_of="grpo", lr=2e-4, warmup_steps=0,
                               schedule="constant")
  c.stages.rejection = stage("rejection_sampling", steps=0, num_prompts=1000, k=4,
                             max_new_tokens=40, temperature=1.0, keep_per_prompt=1,
                             reward_weights={"accuracy": 1.0, "format": 1.0},
                             draft="")  # "mtp": the MTP module drafts (README)
  c.stages.sft_rs = stage("sft", steps=60, data_file="samples/rejection.jsonl", lr=2e-4,
                          warmup_steps=0, schedule="constant")
  c.stages.grpo_final = stage("grpo", steps=20, **dict(grpo, warmup_steps=10))
  c.stages.distill = stage("distill", steps=500, mode="sequence",
                           data_file="samples/rejection.jsonl", with_sft_split=True, lr=3e-3,
                           warmup_steps=20,
                           student=ml_collections.ConfigDict(tiny_student_fields()))
  c.stage_order = ("cold_start", "grpo", "sft_control", "rejection", "sft_rs", "grpo_final",
                   "distill")
  return c
