"""A larger held-out check of an r1_tiny run: accuracy on uncovered problems that no split holds.

    python docs/results/fresh_uncovered.py RUN_DIR [--stages cold_start grpo sft_control]

The recipe's eval set has 50 uncovered problems, so one problem is 0.02 and a difference of two
stages has a standard error near 0.09. This takes the recipe's large held-out set for the run's
seed (`data.num_heldout_uncovered`, 400 two-digit + two-digit sums drawn after every other split,
so disjoint from all of them up to operand order; made here for runs that did not ask for it), and
the first 200 uncovered RL prompts (problems the policy trained on). For each stage it
reports greedy accuracy and the mean accuracy of 8 samples at T=1 on each set, and writes
fresh_uncovered/<--name, default seed<N>>.json next to this file.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import ml_collections
import numpy as np

from r1jax import model
from r1jax.checkpoint import load_model
from r1jax.data.tokenizer import get_tokenizer
from r1jax.model.config import ModelConfig
from r1jax.recipe import make_splits
from r1jax.rollout import engine

HERE = os.path.dirname(os.path.abspath(__file__))


def fresh_problems(c, n: int) -> list[dict]:
  """The recipe's own large held-out set (`data.num_heldout_uncovered`, drawn after every other
  split of the seed), made for runs whose config did not ask for it."""
  c = ml_collections.ConfigDict(c.to_dict())
  c.data.num_heldout_uncovered = n
  return make_splits(c)["heldout"]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("run_dir")
  ap.add_argument("--stages", nargs="+", default=["cold_start", "grpo", "sft_control"])
  ap.add_argument("--fresh", type=int, default=400)
  ap.add_argument("--name", help="the JSON's name (default: seed<N>)")
  a = ap.parse_args()
  with open(os.path.join(a.run_dir, "config.json")) as f:
    c = ml_collections.ConfigDict(json.load(f))  # the run's resolved config
  splits = make_splits(c)
  sets = {"fresh": fresh_problems(c, a.fresh),
          "rl_prompts": [r for r in splits["rl"] if r["bucket"] == "uncovered"][:200],
          "eval": [r for r in splits["eval"] if r["bucket"] == "uncovered"]}
  cfg = ModelConfig.from_config(c.model)
  like = model.init(cfg, jax.random.key(0))
  tok, mesh = get_tokenizer(c.data.tokenizer), jax.make_mesh((1,), ("data",))
  result = {"run_dir": a.run_dir, "seed": int(c.seed), "sizes": {k: len(v) for k, v in sets.items()},
            "stages": {}}
  print("| stage | set | problems | greedy | sampled (8 at T=1) |\n|---|---|---|---|---|")
  for stage in a.stages:
    params = load_model(os.path.join(a.run_dir, "outputs", stage), like)
    result["stages"][stage] = {}
    for name, records in sets.items():
      acc = {}
      for label, sampling, repeats in (
          ("greedy", engine.Sampling(max_new_tokens=40, greedy=True), 1),
          ("sampled", engine.Sampling(max_new_tokens=40, temperature=1.0), 8)):
        scored = engine.rollout(params, cfg, records, tokenizer=tok, mesh=mesh,
                                template=c.data.template, sampling=sampling,
                                rng=jax.random.key(7), repeats=repeats, batch_size=64,
                                reward_weights={"accuracy": 1.0})
        acc[label] = float(np.mean(scored.rewards))
      result["stages"][stage][name] = acc
      print(f"| {stage} | {name} | {len(records)} | {acc['greedy']:.3f} | {acc['sampled']:.3f} |",
            flush=True)
  os.makedirs(os.path.join(HERE, "fresh_uncovered"), exist_ok=True)
  name = a.name or f"seed{c.seed}"
  with open(os.path.join(HERE, "fresh_uncovered", f"{name}.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
