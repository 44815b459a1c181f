"""Speculative rollouts (the MTP module drafts, `generate(draft="mtp")`) against plain decoding,
on a trained r1_tiny policy and its own RL prompts.

    python benchmarks/speculative.py --from_run RUN_DIR   # a finished r1_tiny run
    python benchmarks/speculative.py                      # trains a 100-step cold start first

For each stage output of the run (`--stages`, default cold_start and grpo; those present), and
each shape (`--shapes`: rows x new tokens; the rows are the run's first RL prompts, each repeated
`--group` times in the GRPO shape), both decoders sample the same prompts at temperature 1 with
the end token on (completions end where the policy ends them, as in GRPO), timed round-robin,
one call of each per round, `--rounds` rounds after a warm-up call of each (which includes the
compile); the median call. The figures: the drafts' acceptance rate, decode steps against plain
decoding's (its longest completion), new tokens per second, and the plain / speculative time
ratio (> 1: speculative is faster). Greedy rows also check that both decoders give the same
tokens. Prints a table; writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "speculative.json"


def cold_start(workdir: pathlib.Path, seed: int, steps: int):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "r1jax.launch", "--config",
                         str(ROOT / "configs" / "r1_tiny.py"), "--workdir", str(workdir),
                         f"--config.seed={seed}", "--config.stage_order=('cold_start',)",
                         f"--config.stages.cold_start.steps={steps}"],
                        cwd=ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"cold start failed:\n{proc.stderr[-3000:]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--from_run", default="", help="a finished r1_tiny run directory")
  ap.add_argument("--seed", type=int, default=0, help="the fresh cold start's seed")
  ap.add_argument("--stages", default="cold_start,grpo")
  ap.add_argument("--shapes", default="256x32,16x32,1x32",
                  help="rows x new tokens; rows > 16 are prompts x --group samples")
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--greedy_shape", default="64x40", help="a greedy (evaluation-like) shape")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  from r1jax import model, recipe, run_config
  from r1jax.checkpoint import outputs, sources
  from r1jax.data.tokenizer import get_tokenizer
  from r1jax.model.config import ModelConfig
  from r1jax.rollout import engine, sampler

  tmp = None
  run = pathlib.Path(args.from_run) if args.from_run else None
  if run is None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="speculative_"))
    run = tmp / "cold"
    cold_start(run, args.seed, 100)
  conf = run_config.from_file(str(ROOT / "configs" / "r1_tiny.py"))
  conf.seed = json.loads((run / "config.json").read_text())["seed"]
  tok = get_tokenizer(sources.resolve(conf.data.tokenizer))
  records = recipe.make_splits(conf)["rl"]
  shapes = [(s, False) for s in args.shapes.split(",")] + (
      [(args.greedy_shape, True)] if args.greedy_shape else [])
  rows = []
  for stage in args.stages.split(","):
    if not (run / "outputs" / stage).exists():
      print(f"{stage}: no output in {run}; skipped", flush=True)
      continue
    saved = outputs.saved_model_config(run / "outputs" / stage)
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    params = outputs.load_model(run / "outputs" / stage, model.init(cfg, jax.random.key(0)))
    for shape, greedy in shapes:
      B, N = map(int, shape.split("x"))
      group = args.group if B > 16 and not greedy else 1
      chosen = [r for r in records[:B // group] for _ in range(group)]
      prompts = [tok.encode(p) for p in engine.format_prompts(chosen, conf.data.template, tok)]

      def call(draft, rnd):
        kw = dict(greedy=True) if greedy else dict(temperature=1.0)
        t0 = time.perf_counter()
        out = sampler.generate(params, cfg, prompts, max_new_tokens=N,
                               rng=jax.random.key(rnd), eos_id=tok.eos_id, pad_id=tok.pad_id,
                               vocab_limit=tok.vocab_size, draft=draft, **kw)
        return time.perf_counter() - t0, out

      times, outs = {"": [], "mtp": []}, {"": [], "mtp": []}
      for rnd in range(args.rounds + 1):
        for draft in ("", "mtp"):
          t, out = call(draft, rnd)
          if rnd:  # round 0 is the warm-up (compile)
            times[draft].append(t)
            outs[draft].append(out)
      plain_s, spec_s = statistics.median(times[""]), statistics.median(times["mtp"])
      spec = outs["mtp"]
      row = dict(
          stage=stage, rows=B, new_tokens=N, group=group, greedy=greedy,
          plain_s=plain_s, speculative_s=spec_s, speedup=plain_s / spec_s,
          accept_rate=sum(o.draft_accepted for o in spec) / sum(o.draft_proposed for o in spec),
          plain_steps=statistics.mean(float(o.lengths.max()) for o in outs[""]),
          speculative_steps=statistics.mean(float(o.decode_steps + 1) for o in spec),
          plain_tok_s=statistics.mean(float(o.lengths.sum()) for o in outs[""]) / plain_s,
          speculative_tok_s=statistics.mean(float(o.lengths.sum()) for o in spec) / spec_s,
          mean_length=statistics.mean(float(o.lengths.mean()) for o in spec))
      if greedy:
        row["same_tokens"] = all(np.array_equal(a.completion, b.completion)
                                 for a, b in zip(outs[""], spec))
      rows.append(row)
      print(row, flush=True)
  print(f"\n{'stage':>10} {'rows x N':>9} {'greedy':>6} {'accept':>6} {'steps':>11} "
        f"{'plain s':>8} {'spec s':>8} {'speed-up':>8}")
  for r in rows:
    print(f"{r['stage']:>10} {r['rows']:>5}x{r['new_tokens']:<3} {str(r['greedy']):>6} "
          f"{r['accept_rate']:6.3f} {r['plain_steps']:5.1f}/{r['speculative_steps']:<5.1f} "
          f"{r['plain_s']:8.4f} {r['speculative_s']:8.4f} {r['speedup']:7.2f}x")
  provenance.write_result(args.out, dict(
      benchmark="speculative", jax=importlib.metadata.version("jax"), cpu_count=os.cpu_count(),
      from_run=args.from_run or f"fresh 100-step cold start (seed {args.seed})",
      seed=int(conf.seed), rounds=args.rounds, rows=rows))
  if tmp is not None:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
