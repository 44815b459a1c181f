"""GRPO on an ensemble of reward models, scored by the lowest of their scores.

    python -m r1jax.launch --config configs/r1_tiny_rm_ensemble.py --config.seed=56

`configs/r1_tiny_rm.py` showed GRPO on one learned reward model gaming it. An ensemble is the
other usual check (Coste et al. 2023, "Reward model ensembles help mitigate overoptimization"):
a completion scores high only if every member agrees ("min"). This config runs r1_tiny_rm's five
stages unchanged (the same seed gives the same cold start, pairs, `rm`, `grpo` and `grpo_rm`),
then:
  rm_2 .. rm_4   three more reward models like `rm`: the same pairs, 300 steps from the cold
                 start's trunk; each stage's name seeds its head, its pair order and its
                 held-out tenth of the questions, so the members differ in those
  grpo_ens       control branch: grpo_rm's 300 steps from the cold start, the reward model's
                 score being the lowest of the four (format kept, accuracy logged at weight 0)
The settings were fixed before any run of this config (four members, "min"); no seed was tuned
on.
"""

import ml_collections

from r1jax.run_config import from_file

MEMBERS = 4


def get_config(arg=None):
  c = from_file("r1_tiny_rm.py", arg, relative_to=__file__)
  names = ["rm"] + [f"rm_{i}" for i in range(2, MEMBERS + 1)]
  for name in names[1:]:
    c.stages[name] = ml_collections.ConfigDict(c.stages.rm.to_dict())
  c.stages.grpo_ens = ml_collections.ConfigDict(dict(
      c.stages.grpo_rm.to_dict(), reward_model=",".join(names), reward_model_aggregate="min"))
  c.stage_order = tuple(c.stage_order) + tuple(names[1:]) + ("grpo_ens",)
  return c
