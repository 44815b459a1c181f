"""Synchronous against asynchronous GRPO through the launcher: r1_tiny's `grpo` stage, the same
cold start, the step time each way.

    python benchmarks/grpo_async.py --from_run RUN_DIR   # a finished r1_tiny run's cold start
    python benchmarks/grpo_async.py                      # trains a 100-step cold start first

Rows, each a fresh launcher process whose `grpo` stage runs `--steps` steps from a copy of the
cold start (config.json removed, every later stage dropped):
  sync        configs/r1_tiny.py, one CPU device: sample, then update, every step
  async       configs/r1_tiny_async.py, two simulated CPU devices: the update on one, the next
              batch's rollout (one update behind) on the other, at the same time; with the
              decoupled correction (is_correction=token_tis: one more forward per step)
  async_no_correction   the same without the correction (the ratio against the sampler's
              log-probs; no extra forward)
  async_shared  asynchronous on one device (rollout_devices=0): the device samples batch t+1
              and then updates on batch t, while the host decodes and scores batch t
The rows run one after the other, `--rounds` times in alternation (this machine's speed drifts),
and each reports the median `step_seconds` of the logged steps after `--skip` (compiles, and a
new completion length under `length_bucket` compiles again). The asynchronous rollout
dispatched at step t is collected at step t+1: `rollout_seconds` there is the wait for it plus
scoring. Prints a table; writes benchmarks/results/grpo_async.json.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "grpo_async.json"
# mode -> (config, simulated CPU devices, extra overrides)
MODES = {"sync": ("configs/r1_tiny.py", 1, ()),
         "async": ("configs/r1_tiny_async.py", 2, ()),
         "async_no_correction": ("configs/r1_tiny_async.py", 2,
                                 ("--config.stages.grpo.is_correction=none",)),
         "async_shared": ("configs/r1_tiny_async.py", 1,
                          ("--config.stages.grpo.rollout_devices=0",))}


def launch(config, devices, workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-m", "r1jax.launch", "--config", str(ROOT / config),
                         "--workdir", str(workdir), *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"launcher failed ({config}):\n{proc.stderr[-3000:]}")


def fork_cold_start(src: pathlib.Path, dst: pathlib.Path):
  """A run directory holding only `src`'s finished cold start."""
  for sub in ("checkpoints", "outputs"):
    shutil.copytree(src / sub / "cold_start", dst / sub / "cold_start")
  progress = json.loads((src / "progress.json").read_text())
  progress.update(completed=["cold_start"],
                  summary=[e for e in progress["summary"] if e["name"] == "cold_start"])
  (dst / "progress.json").write_text(json.dumps(progress))


def grpo_steps(workdir):
  with open(workdir / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  return [r for r in recs if r["stage"] == "grpo" and "loss" in r]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--from_run", default="", help="a finished r1_tiny run directory")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--skip", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="grpo_async_"))
  source = pathlib.Path(args.from_run) if args.from_run else tmp / "cold"
  if not args.from_run:
    launch(MODES["sync"][0], 1, source, f"--config.seed={args.seed}",
           "--config.stage_order=('cold_start',)", "--config.stages.cold_start.steps=100")
  seed = json.loads((source / "config.json").read_text())["seed"] if args.from_run else args.seed
  overrides = [f"--config.seed={seed}", "--config.stage_order=('cold_start','grpo')",
               f"--config.stages.grpo.steps={args.steps}", "--config.log.every_steps=1"]
  rows = []
  for r in range(args.rounds):
    for mode, (config, devices, extra) in MODES.items():
      workdir = tmp / f"{mode}_{r}"
      fork_cold_start(source, workdir)
      launch(config, devices, workdir, *overrides, *extra)
      steps = grpo_steps(workdir)[args.skip:]
      rows.append(dict(mode=mode, round=r, devices=devices, steps=len(steps),
                       step_s=statistics.median(s["step_seconds"] for s in steps),
                       rollout_s=statistics.median(s["rollout_seconds"] for s in steps),
                       reward=statistics.mean(s["reward"] for s in steps),
                       update_rows=statistics.mean(s["update_rows"] for s in steps)))
      print(rows[-1], flush=True)
  sync = statistics.median(x["step_s"] for x in rows if x["mode"] == "sync")
  out_rows = []
  print(f"\n{'mode':>19} {'round':>5} {'step s':>7} {'rollout s':>9} {'reward':>7} "
        f"{'vs sync':>7}")
  for x in rows:
    x["speedup_vs_sync_median"] = sync / x["step_s"]
    out_rows.append(x)
    print(f"{x['mode']:>19} {x['round']:>5} {x['step_s']:7.3f} {x['rollout_s']:9.3f} "
          f"{x['reward']:7.3f} {x['speedup_vs_sync_median']:6.2f}x")
  provenance.write_result(args.out, dict(
      benchmark="grpo_async", jax=importlib.metadata.version("jax"), cpu_count=os.cpu_count(),
      from_run=args.from_run or "fresh 100-step cold start", seed=seed,
      steps=args.steps, skip=args.skip, rows=out_rows))
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
