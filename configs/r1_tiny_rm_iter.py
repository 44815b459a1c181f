"""Iterated reward modelling: GRPO on a reward model that is retrained, every 30 steps, on pairs
from the policy it shapes.

    python -m r1jax.launch --config configs/r1_tiny_rm_iter.py --config.seed=56

`configs/r1_tiny_rm.py` showed GRPO on a fixed learned reward model gaming it: the policy found
answers the model scored high and the rule failed, and ended answering one number to every
problem. The usual cure (InstructGPT's and Llama 2's rounds of fresh preference labels,
"iterated RLHF") is to label pairs from the current policy and retrain the reward model on them,
so that what the policy has learned to exploit is in its next reward model's data. This config
runs r1_tiny_rm's stages unchanged (the same seed gives the same five stages: cold start, cold
samples, reward model, GRPO on the rule, GRPO on the fixed reward model), then the same 300 GRPO
steps in ROUNDS rounds of STEPS:
  rm_it<i>        GRPO from the policy (round 1: from the cold start), reward_model = the latest
                  reward model (round 1: `rm`), format kept, accuracy logged at weight 0, the KL
                  term to the cold start (ref_from) as in one 300-step stage
  rm_it<i>_samples  8 samples from that policy for each of PROMPTS RL prompts; pairs (right,
                  wrong) as cold_samples makes them: the rule stands in for the people who label
                  pairs in RLHF, so each round costs PROMPTS x 8 labels
  rm_it<i>_rm     the reward model continued (start_from the last one) for RM_STEPS steps on
                  every pair so far (cold_samples' and each round's), its held-out questions
                  kept held out
The last round's policy is evaluated on the same held-out problems as `grpo` and `grpo_rm`. What
differs from one 300-step stage besides the reward: the optimizer's moments restart each round
(the lr is constant, without warm-up, in both).

The settings were fixed before any run of this config, from what seeds 54 and 55 of r1_tiny_rm
showed (their true accuracy fell below half its start after 36 and 54 steps on the fixed reward
model, so a round is 30 steps); no seed was tuned on.
"""

import ml_collections

from r1jax.run_config import from_file, stage

ROUNDS, STEPS, PROMPTS, RM_STEPS = 10, 30, 1000, 100


def get_config(arg=None):
  c = from_file("r1_tiny_rm.py", arg, relative_to=__file__)
  order = list(c.stage_order)
  grpo_rm = c.stages.grpo_rm.to_dict()
  reward_model, pair_files = "rm", ["samples/cold_samples_pairs.jsonl"]
  for i in range(1, ROUNDS + 1):
    name = f"rm_it{i}"
    last = i == ROUNDS
    c.stages[name] = ml_collections.ConfigDict(dict(
        grpo_rm, steps=STEPS, branch=False, start_from="cold_start" if i == 1 else "",
        ref_from="cold_start", reward_model=reward_model, eval=last))
    order.append(name)
    if last:
      break
    c.stages[name + "_samples"] = stage(
        "rejection_sampling", steps=0, num_prompts=PROMPTS, k=8, max_new_tokens=40,
        temperature=1.0, keep_per_prompt=1, reward_weights={"accuracy": 1.0, "format": 1.0},
        pairs=True, pairs_per_prompt=4)
    pair_files.append(f"samples/{name}_samples_pairs.jsonl")
    c.stages[name + "_rm"] = ml_collections.ConfigDict(dict(
        c.stages.rm.to_dict(), steps=RM_STEPS, start_from=reward_model,
        data_file=",".join(pair_files)))
    reward_model = name + "_rm"
    order += [name + "_samples", reward_model]
  c.stage_order = tuple(order)
  return c
