"""How much each side's SFT step gains from the CPU's second core: `train_step.py`'s step on the
tiny MoE, run in child processes pinned to one core and to two, r1jax and transformers.

    python benchmarks/step_threads.py   # prints a table, writes results/step_threads.json

The README once read `step_profile.py`'s trace (one XLA op running during most of the step) as
"XLA:CPU runs each op on one thread", and named that as the gap to transformers, whose ops use
both threads. The trace records ops, not the threads inside an op, so this script measures it
directly. Each child sets its CPU affinity before jax or torch starts its thread pool (both size
their pools from the affinity), builds the step, and times `--runs` steps after `--warmup`. The
children run one at a time, round-robin over the rows and core counts, for `--rounds` rounds; a
row's figure is the median over its rounds' medians.

Rows:
- r1jax: `train.make_step(sft_loss)` as `train_step.py` times it (dropless `blocked` MoE, no MTP);
- r1jax, the batch as two independent halves: the same step, with the loss computed on each half
  and combined by token weights inside one jitted function. The halves share no ops until the
  gradient sum, so XLA:CPU's thunk executor could run them side by side on the two cores;
- transformers: `DeepseekV3ForCausalLM` on the same weights at its defaults, `loss.backward()` +
  clip + AdamW (`train_step.torch_step`).
With `--sides r1jax_generate,transformers_generate` the rows are `rollout.py`'s sampling calls
instead (`--generate_shape` rows x new tokens after 16-token prompts, no early stop; its tiny MoE
and weights), one call per timed run; write those to another file with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "step_threads.json"
SIDES = ("r1jax", "r1jax_halves", "transformers")
GENERATE_SIDES = ("r1jax_generate", "transformers_generate")
NAMES = {"r1jax": "r1jax make_step (jit, sft_loss, AdamW)",
         "r1jax_halves": "r1jax, the batch as two independent halves in one step",
         "transformers": "transformers DeepseekV3 (backward + AdamW), its defaults",
         "r1jax_generate": "r1jax sampler.generate (rollout.py's call)",
         "transformers_generate": "transformers generate (rollout.py's call)"}


def halves_loss(loss_fn):
  """loss_fn computed on the batch's two halves and combined by their weights (token counts):
  the whole batch's loss, with two independent chains of ops."""
  import jax

  def loss(params, batch, rng, frozen):
    B = batch["tokens"].shape[0] // 2
    outs = [loss_fn(params, jax.tree.map(lambda x: x[i * B:(i + 1) * B], batch), rng, frozen)
            for i in range(2)]
    w = [m["_weight"] for _, m in outs]
    total = w[0] + w[1]
    value = (outs[0][0] * w[0] + outs[1][0] * w[1]) / total
    metrics = {k: (outs[0][1][k] * w[0] + outs[1][1][k] * w[1]) / total for k in outs[0][1]
               if k not in ("_weight", "_counts", "tokens")}
    metrics.update(tokens=outs[0][1]["tokens"] + outs[1][1]["tokens"], _weight=total)
    if "_counts" in outs[0][1]:
      metrics["_counts"] = jax.tree.map(lambda a, b: a + b, outs[0][1]["_counts"],
                                        outs[1][1]["_counts"])
    return value, metrics
  return loss


def child(side: str, cpus: list[int], a) -> dict:
  os.sched_setaffinity(0, cpus)  # before jax or torch sizes its thread pool
  sys.path.insert(0, str(ROOT))
  import jax
  import jax.numpy as jnp
  from benchmarks.train_step import make_batch, optim_config, tiny_config, torch_step
  from r1jax import hf, model, train
  from r1jax.train import state as state_lib

  if side in GENERATE_SIDES:
    once, threads = generate_call(side, a)
    return _time(once, threads, a)
  cfg = tiny_config(None, "blocked")
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  batch = make_batch(cfg, a.batch, a.seq_len)
  if side == "transformers":
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
      hf.save(tmp, cfg, params)
      hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    once, threads = torch_step(hf_model, batch, a.lr), torch.get_num_threads()
  else:
    loss_fn = train.sft_loss(cfg)
    if side == "r1jax_halves":
      loss_fn = halves_loss(loss_fn)
    tx, sched = train.make_optimizer(optim_config(a.lr), total_steps=1000)
    step = train.make_step(loss_fn, tx, sched, bias_gamma=1e-3)
    holder = {"state": state_lib.create(params, tx, seed=0)}
    jbatch = jax.tree.map(jnp.asarray, batch)

    def once():
      holder["state"], metrics = step(holder["state"], jbatch)
      return float(jax.block_until_ready(metrics["loss"]))
    threads = None
  return _time(once, threads, a)


def generate_call(side: str, a):
  """rollout.py's sampling call on its tiny MoE: (a function making one call, torch threads)."""
  import jax
  import numpy as np
  from benchmarks.rollout import sampling_calls, tiny_config as rollout_config
  from r1jax import hf, model

  cfg = rollout_config()
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  B, N = (int(v) for v in a.generate_shape.split("x"))
  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, 16))
  if side == "r1jax_generate":
    return sampling_calls(params, cfg, None, prompts, N)[0], None
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(tmp, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
  return sampling_calls(params, cfg, hf_model, prompts, N)[1], torch.get_num_threads()


def _time(once, threads, a) -> dict:
  from benchmarks.train_step import time_round_robin
  first_loss = once()
  times = time_round_robin([once], a.warmup, a.runs)[0]
  return {"median_s": statistics.median(times), "runs_s": times, "first_loss": first_loss,
          "cpus": sorted(os.sched_getaffinity(0)), "torch_threads": threads}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--runs", type=int, default=15)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--sides", default=",".join(SIDES), help=f"of {SIDES + GENERATE_SIDES}")
  ap.add_argument("--generate_shape", default="128x40", help="rows x new tokens (generate sides)")
  ap.add_argument("--child", choices=SIDES + GENERATE_SIDES, help=argparse.SUPPRESS)
  ap.add_argument("--cpus", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=str(RESULTS))
  a = ap.parse_args()
  if a.child:
    print(json.dumps(child(a.child, [int(c) for c in a.cpus.split(",")], a)))
    return

  available = sorted(os.sched_getaffinity(0))
  if len(available) < 2:
    sys.exit("step_threads.py needs two CPU cores")
  core_sets = {1: available[:1], 2: available[:2]}
  sides = a.sides.split(",")
  medians = {(s, n): [] for s in sides for n in core_sets}
  children = {(s, n): [] for s in sides for n in core_sets}
  for r in range(a.rounds):
    for s in sides:
      for n, cpus in core_sets.items():
        cmd = [sys.executable, __file__, "--child", s, "--cpus", ",".join(map(str, cpus)),
               f"--batch={a.batch}", f"--seq_len={a.seq_len}", f"--warmup={a.warmup}",
               f"--runs={a.runs}", f"--lr={a.lr}", f"--generate_shape={a.generate_shape}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        medians[(s, n)].append(res["median_s"])
        children[(s, n)].append(res)
        print(f"round {r + 1}: {s:13s} on {n} core(s): {1e3 * res['median_s']:7.1f} ms",
              flush=True)

  import jax
  import torch
  rows = []
  for s in sides:
    one, two = (statistics.median(medians[(s, n)]) for n in (1, 2))
    rows.append({"side": s, "name": NAMES[s], "one_core_s": one, "two_cores_s": two,
                 "second_core_speedup": one / two,
                 "children": {str(n): children[(s, n)] for n in core_sets}})
  by = {r["side"]: r for r in rows}
  what = (f"sampling {a.generate_shape} (rows x new tokens)" if set(sides) & set(GENERATE_SIDES)
          else f"SFT step, batch {a.batch} x {a.seq_len}")
  print(f"tiny DeepSeek-V3 {what}, jax {jax.__version__}, torch {torch.__version__}; median of "
        f"{a.rounds} children's medians of {a.runs} calls")
  print(f"{'':58s} {'1 core ms':>10s} {'2 cores ms':>11s} {'2nd core':>9s}")
  for r in rows:
    print(f"{r['name']:58s} {1e3 * r['one_core_s']:10.1f} {1e3 * r['two_cores_s']:11.1f} "
          f"{r['second_core_speedup']:8.2f}x")
  ratios = {}
  for ours, theirs in (("r1jax", "transformers"), ("r1jax_generate", "transformers_generate")):
    if ours in by and theirs in by:
      ratios = {str(n): by[theirs][k] / by[ours][k]
                for n, k in ((1, "one_core_s"), (2, "two_cores_s"))}
      print(f"{ours} speed / {theirs}': {ratios['1']:.2f}x on one core, "
            f"{ratios['2']:.2f}x on two")
  sys.path.insert(0, str(ROOT))
  from benchmarks import provenance
  provenance.write_result(a.out, {
      "benchmark": "step_threads", "batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup,
      "sides": sides, "generate_shape": a.generate_shape if set(sides) & set(GENERATE_SIDES)
      else None,
      "runs": a.runs, "rounds": a.rounds, "jax": jax.__version__, "torch": torch.__version__,
      "core_sets": {str(n): c for n, c in core_sets.items()}, "rows": rows,
      "r1jax_over_transformers": ratios})


if __name__ == "__main__":
  main()
