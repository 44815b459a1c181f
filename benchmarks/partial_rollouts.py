"""Partial rollouts (`partial_tokens`) against whole-completion rollouts, at a GRPO step's shape
with long-tailed completion lengths.

    python benchmarks/partial_rollouts.py   # prints a table, writes results/partial_rollouts.json

r1_tiny's MoE with random weights (x3, so its distributions are peaked) samples r1_tiny's RL
prompts, 32 prompts x 8 samples per step, up to 96 new tokens, T=1. Its stop token is the
token it emits at about one position in `--stop_every` (16), so completion lengths are roughly
geometric: most rows stop within a few dozen tokens and the longest of 256 runs several times
the mean, the long tail of R1-style RL. Both sides deliver 32 complete groups per step from the
same weights (no update between steps):
  whole       `engine.rollout`: one generate call per step, which runs until its longest row
              stops;
  partial     `rollout.partial.PartialRollouts` with `--segment` (16) tokens per call: calls of
              256 rows (carried rows first, then new groups) until 32 groups are complete.
After `--warmup` steps of each (compiles: the partial side compiles one shape per prompt-length
bucket of its carried rows), `--rounds` steps of each are timed round-robin. Both hand over 32
complete groups per step, so the headline is the ratio of mean step times (groups per second).
The table adds the completion tokens each side handed over per second and their lengths: a
partial step hands over the groups that finished first, so over a few steps its rows are
shorter, the long ones still in its buffer.

`--from_run RUN_DIR` samples with a finished r1_tiny run's policy (`--stage`, the cold start by
default) and its real stop token instead: completions of about 20 tokens and rare runaways that
run to `--new_tokens`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import types

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from r1jax import model, recipe, run_config  # noqa: E402
from r1jax.checkpoint import outputs  # noqa: E402
from r1jax.data.tokenizer import get_tokenizer  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.parallel import make_mesh  # noqa: E402
from r1jax.rollout import engine, partial, sampler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "partial_rollouts.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=96)
  ap.add_argument("--segment", type=int, default=16)
  ap.add_argument("--stop_every", type=float, default=16.0)
  ap.add_argument("--warmup", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--from_run", default="",
                  help="a finished r1_tiny run: sample with its policy and real stop token")
  ap.add_argument("--stage", default="cold_start", help="with --from_run: whose output")
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  c = run_config.from_file(str(ROOT / "configs" / "r1_tiny.py"))
  char = get_tokenizer("char")
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  G, N = args.group, args.new_tokens
  sampling = engine.Sampling(max_new_tokens=N, temperature=args.temperature)
  if args.from_run:  # a trained policy: its own stop token, its own runaways
    run = pathlib.Path(args.from_run)
    c.seed = json.loads((run / "config.json").read_text())["seed"]
    saved = outputs.saved_model_config(run / "outputs" / args.stage)
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    params = outputs.load_model(run / "outputs" / args.stage, model.init(cfg, jax.random.key(0)))
    cfg, tok, eos = sampler.policy_config(cfg), char, char.eos_id
    records = recipe.make_splits(c)["rl"]
  else:
    cfg = sampler.policy_config(ModelConfig.from_config(c.model))
    params = jax.jit(lambda r: jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x,
                                            model.init(cfg, r)))(jax.random.key(0))
    records = recipe.make_splits(c)["rl"]
    probe = engine.rollout(params, cfg, records[:args.prompts], tokenizer=char, mesh=mesh,
                           template="r1", sampling=sampling, rng=jax.random.key(0),
                           repeats=G).rollout
    counts = np.bincount(probe.completion.reshape(-1), minlength=cfg.vocab_size).astype(float)
    counts[[char.pad_id, char.eos_id]] = 0
    eos = int(np.argmin(np.abs(counts / counts.sum() - 1 / args.stop_every)))
    tok = types.SimpleNamespace(encode=char.encode, decode=char.decode, eos_id=eos,
                                pad_id=char.pad_id, vocab_size=char.vocab_size,
                                markers=char.markers)
  batches = iter([records[i:i + args.prompts]
                  for i in range(0, len(records) - args.prompts + 1, args.prompts)] * 50)
  kw = dict(tokenizer=tok, mesh=mesh, template="r1", sampling=sampling,
            reward_weights={"accuracy": 1.0})
  buffer = partial.PartialRollouts(G, args.segment, N)
  steps = {"whole": 0, "partial": 0}

  def step(side):
    key = jax.random.key(1000 * (side == "partial") + steps[side])
    steps[side] += 1
    t0 = time.perf_counter()
    if side == "whole":
      scored, calls = engine.rollout(params, cfg, next(batches), rng=key, repeats=G, **kw), 1
    else:
      scored, stats = buffer.next_batch(params, cfg, draw=lambda: next(batches),
                                        groups=args.prompts, rows=args.prompts * G, rng=key,
                                        **kw)
      calls = stats["partial_calls"]
    seconds = time.perf_counter() - t0
    return seconds, np.asarray(scored.rollout.lengths), calls

  sides = ("whole", "partial")
  for _ in range(args.warmup):
    for side in sides:
      step(side)
  runs = {side: [] for side in sides}
  for _ in range(args.rounds):
    for side in sides:
      runs[side].append(step(side))

  rows = []
  for side in sides:
    secs = [r[0] for r in runs[side]]
    lengths = np.concatenate([r[1] for r in runs[side]])
    rows.append({"name": side, "step_s_mean": statistics.mean(secs),
                 "step_s_median": statistics.median(secs), "step_s_max": max(secs), "step_s": secs,
                 "tokens_per_s": float(lengths.sum() / sum(secs)),
                 "calls_per_step": float(np.mean([r[2] for r in runs[side]])),
                 "length_mean": float(lengths.mean()),
                 "length_p90": float(np.percentile(lengths, 90)),
                 "length_max": int(lengths.max()),
                 "truncated_frac": float(np.mean(lengths >= N))})
  # both hand over the same number of complete groups per step
  ratio = rows[0]["step_s_mean"] / rows[1]["step_s_mean"]
  policy = (f"{args.from_run}'s {args.stage}" if args.from_run
            else f"random weights x3, stop token ~1 in {args.stop_every:g} positions")
  print(f"r1_tiny MoE ({policy}), T={args.temperature:g}, {args.prompts} prompts x {G} samples per step, up to "
        f"{N} new tokens, segment "
        f"{args.segment}, {args.rounds} timed steps each, CPU, jax {jax.__version__}")
  print(f"{'':8s} {'step s: mean':>12s} {'median':>7s} {'max':>6s} {'calls/step':>10s} "
        f"{'tokens/s':>9s} {'length mean':>11s} {'p90':>5s} {'max':>4s} {'truncated':>9s}")
  for r in rows:
    print(f"{r['name']:8s} {r['step_s_mean']:12.3f} {r['step_s_median']:7.3f} "
          f"{r['step_s_max']:6.2f} {r['calls_per_step']:10.2f} {r['tokens_per_s']:9.0f} "
          f"{r['length_mean']:11.1f} {r['length_p90']:5.0f} {r['length_max']:4d} "
          f"{r['truncated_frac']:9.3f}")
  print(f"groups per second (mean step time), partial / whole: {ratio:.2f}x")
  provenance.write_result(args.out, {
      "model": f"r1_tiny MoE, {policy}", "temperature": args.temperature, "prompts": args.prompts, "group": G,
      "new_tokens": N, "segment": args.segment, "stop_every": args.stop_every, "eos": eos,
      "warmup": args.warmup, "rounds": args.rounds, "jax": jax.__version__, "results": rows,
      "groups_per_s_ratio": ratio})


if __name__ == "__main__":
  main()
