"""Do speculative rollouts sample what plain rollouts sample? Sequence-level statistics of
GRPO-shaped rollouts (32 RL prompts x 8 samples, 32 new tokens, temperature 1, the end token on)
from a trained r1_tiny policy, `--calls` calls each with keys 1000, 1001, ..., plain decoding
and `draft="mtp"` with the same keys: mean total reward, completion length, accuracy and
log-prob per token, each with the standard error over calls. Exact speculative sampling leaves
all four unchanged in expectation (not call by call: the draws differ).

    python docs/results/speculative/rollout_stats.py RUN_DIR [STAGE] [--calls 30]
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)
from r1jax import model, recipe, run_config  # noqa: E402
from r1jax.checkpoint import outputs, sources  # noqa: E402
from r1jax.data.tokenizer import get_tokenizer  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.parallel import make_mesh  # noqa: E402
from r1jax.rollout import engine  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("run")
  ap.add_argument("stage", nargs="?", default="cold_start")
  ap.add_argument("--seed", type=int, help="the run's seed (default: its config.json's)")
  ap.add_argument("--calls", type=int, default=30)
  a = ap.parse_args()
  conf = run_config.from_file(os.path.join(ROOT, "configs", "r1_tiny.py"))
  conf.seed = a.seed if a.seed is not None else json.load(
      open(os.path.join(a.run, "config.json")))["seed"]
  out_dir = os.path.join(a.run, "outputs", a.stage)
  cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in outputs.saved_model_config(out_dir).items()})
  params = outputs.load_model(out_dir, model.init(cfg, jax.random.key(0)))
  tok = get_tokenizer(sources.resolve(conf.data.tokenizer))
  records = recipe.make_splits(conf)["rl"][:32]
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  stats = {"": [], "mtp": []}
  for call in range(a.calls):
    for draft in stats:
      scored = engine.rollout(params, cfg, records, tokenizer=tok, mesh=mesh,
                              template=conf.data.template,
                              sampling=engine.Sampling(max_new_tokens=32, draft=draft),
                              rng=jax.random.key(1000 + call), repeats=8,
                              reward_weights={"accuracy": 1.0, "format": 0.2})
      ro = scored.rollout
      stats[draft].append((scored.rewards.mean(), ro.lengths.mean(),
                           np.mean(scored.per_reward["accuracy"]),
                           ro.logprobs.sum() / ro.completion_mask.sum()))
  print(f"{a.run} {a.stage} (seed {conf.seed}), {a.calls} calls of 256 rows each, "
        "mean +- standard error over calls:")
  print("| decoding | reward | completion length | accuracy | log-prob per token |")
  print("|---|---|---|---|---|")
  for draft, rows in stats.items():
    x = np.array(rows)
    cells = [f"{m:.4f} +- {s:.4f}" for m, s in zip(x.mean(0), x.std(0) / np.sqrt(len(x)))]
    print(f"| {'speculative (mtp)' if draft else 'plain'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
