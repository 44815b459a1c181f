"""GRPO on a learned reward model against GRPO on the rule, from the same cold start.

    python -m r1jax.launch --config configs/r1_tiny_rm.py --config.seed=54

DeepSeek-R1's last RL stage scores what a rule can judge with the rule and everything else with
reward models. This config asks what that costs where the rule exists: r1_tiny's cold start and
rule-reward GRPO run as there (the same seed gives the same two stages), and beside them:
  cold_samples  rejection sampling from the cold start: 8 answers to each of the 2000 RL
                prompts; every prompt with a right and a wrong answer gives up to 4 preference
                pairs (right, wrong) of distinct answers
  rm            a reward model: the cold start's trunk with a one-label score head, trained with
                the Bradley-Terry loss for 300 steps of 16 pairs on the pairs of 90 % of the
                questions; evaluated on the other 10 % (pairwise accuracy)
  grpo_rm       control branch: r1_tiny's GRPO from the cold start with the reward model's score
                in place of the accuracy rule (format kept), the same 300 steps; the rule's
                accuracy is logged at weight 0 (what the policy's samples really scored)
The recipe stops there: `grpo` is the rule-reward run, `grpo_rm` the learned-reward one, both
evaluated on the same held-out problems. The sampling and reward-model settings were chosen on
the tuned seed 4 from an older cold start (three pilots: 1000 x 4 samples, one pair per prompt,
150 steps at lr 2e-4: 155 pairs, held-out pairwise accuracy 0.56; 2000 x 8, one pair: 454 pairs,
0.62; up to 4 pairs per prompt, 300 steps: 925 pairs, 0.69 at lr 2e-4 and 0.73 at 6e-4).
"""

import ml_collections

from r1jax.run_config import from_file, stage


def get_config(arg=None):
  c = from_file("r1_tiny.py", arg, relative_to=__file__)
  c.stages.cold_samples = stage("rejection_sampling", steps=0, num_prompts=2000, k=8,
                                max_new_tokens=40, temperature=1.0, keep_per_prompt=1,
                                reward_weights={"accuracy": 1.0, "format": 1.0}, pairs=True,
                                pairs_per_prompt=4)
  c.stages.rm = stage("reward_model", steps=300, data_file="samples/cold_samples_pairs.jsonl",
                      start_from="cold_start", pairs_per_step=16, heldout_frac=0.1,
                      lr=6e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0)
  c.stages.grpo_rm = ml_collections.ConfigDict(dict(
      c.stages.grpo.to_dict(), start_from="cold_start", branch=True,
      # accuracy at weight 0: logged (reward_accuracy), not trained on
      reward_weights={"reward_model": 1.0, "format": 0.2, "accuracy": 0.0}, reward_model="rm"))
  c.stage_order = ("cold_start", "cold_samples", "rm", "grpo", "grpo_rm")
  return c
