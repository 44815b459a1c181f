"""Where the tiny MoE's SFT step spends its time on XLA:CPU: a jax.profiler trace, summed.

    python benchmarks/step_profile.py        # prints tables, writes results/step_profile.json

The model and batch are `train_step.py`'s (configs/sft_tiny.py's MoE, MTP off, 32 x 64 tokens).
The script
- times, round-robin in one process, the jitted forward (the loss), the gradient, and the full
  step (gradient, clipping, AdamW);
- traces `--traced` full steps with jax.profiler and reads the trace's XLA:CPU op events (one
  event per executed HLO thunk: fusions, dots, copies, scatters, sorts);
- reports the ops' summed thread time per step, by kind, and how many ops were running at once
  over the steps' wall time.

The last table is the point: it says how much of the step kept both cores busy. It explains the
gap to transformers in `train_step.json` better than a FLOP count does (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402
from r1jax import model, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "step_profile.json"
# trace events that are not ops: the executor's own spans, thread-pool bookkeeping, Python
_NOT_OPS = ("ThunkExecutor", "$", "Slinky", "PjRt", "Execute", "ThreadpoolListener", "end: ")
_STEP_EVENT = "ThunkExecutor::Execute (wait for completion)"


def op_summary(events: list[dict], steps: int, whole: bool = False) -> dict:
  """Per-step op counts and thread time by kind, and the share of the steps' wall time during
  which 0, 1, 2, ... ops ran at once. The steps' wall time is that of the last `steps`
  executions of a compiled program, or with `whole` the span from the first op to the last (a
  trace of several programs, e.g. a sampler's prefill and decode loop, as one)."""
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and not e["name"].startswith(_NOT_OPS)]
  if whole:
    windows = [(min(e["ts"] for e in ops), max(e["ts"] + e["dur"] for e in ops))]
  else:
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("ph") == "X" and e.get("name") == _STEP_EVENT)
    windows = windows[-steps:]
  by_kind, count = collections.Counter(), collections.Counter()
  for e in ops:
    kind = re.sub(r"\.\d+$", "", e["name"])
    by_kind[kind] += e["dur"]
    count[kind] += 1
  # a sweep over op start/end points, inside the step windows only
  points = sorted([(e["ts"], 1) for e in ops] + [(e["ts"] + e["dur"], -1) for e in ops]
                  + [(t, 0) for w in windows for t in w])  # idle stretches count too
  running, last, at_once = 0, None, collections.Counter()
  for t, delta in points:
    if last is not None:
      inside = sum(max(0.0, min(t, b) - max(last, a)) for a, b in windows)
      at_once[min(running, 2)] += inside
    running += delta
    last = t
  wall = sum(b - a for a, b in windows)
  total = sum(by_kind.values())
  return {
      "steps": steps if whole else len(windows),
      "step_wall_ms": wall / (steps if whole else len(windows)) / 1e3,
      "ops_per_step": sum(count.values()) / steps,
      "op_thread_ms_per_step": total / steps / 1e3,
      "by_kind": [{"kind": k, "ms_per_step": d / steps / 1e3, "ops_per_step": count[k] / steps}
                  for k, d in by_kind.most_common()],
      "wall_share_by_ops_running": {("2+" if k == 2 else str(k)): v / wall
                                    for k, v in sorted(at_once.items())},
  }


def traced_ops(fn, calls: int, steps: int, whole: bool = False) -> dict:
  """`op_summary` of a jax.profiler trace of `calls` calls of fn() (each blocking)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(calls):
      fn()
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  return op_summary(events, steps, whole=whole)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--runs", type=int, default=15)
  ap.add_argument("--traced", type=int, default=5)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  cfg = ts.tiny_config(capacity_factor=None, moe_impl="blocked")  # train_step's model
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  batch = ts.make_batch(cfg, args.batch, args.seq_len)
  device_batch = jax.tree.map(jnp.asarray, batch)
  loss_fn = train.sft_loss(cfg)

  def loss(p, b):
    return loss_fn(p, b, None, None)[0]

  fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  step = ts.r1jax_step(cfg, jax.tree.map(jnp.copy, params), batch, 1e-3)  # donates its copy
  fns = {"forward (loss)": lambda: jax.block_until_ready(fwd(params, device_batch)),
         "gradient": lambda: jax.block_until_ready(grad(params, device_batch)),
         "full step (gradient + clip + AdamW)": step}
  times = ts.time_round_robin(list(fns.values()), args.warmup, args.runs)
  timed = [{"name": n, "seconds": statistics.median(t), "runs_s": t}
           for n, t in zip(fns, times)]

  prof = traced_ops(step, args.traced, args.traced)

  tokens = args.batch * args.seq_len
  print(f"tiny MoE SFT step, {args.batch} x {args.seq_len} tokens, jax {jax.__version__}, "
        f"{jax.device_count()} CPU device(s)")
  for r in timed:
    print(f"  {r['name']:40s} {1e3 * r['seconds']:8.1f} ms   {tokens / r['seconds']:8.0f} tok/s")
  print(f"traced {prof['steps']} full steps: {prof['step_wall_ms']:.1f} ms wall per step, "
        f"{prof['ops_per_step']:.0f} ops, {prof['op_thread_ms_per_step']:.1f} ms of op thread "
        "time per step")
  for k in prof["by_kind"][:12]:
    print(f"  {k['kind']:32s} {k['ms_per_step']:7.2f} ms  x{k['ops_per_step']:5.0f}")
  share = prof["wall_share_by_ops_running"]
  print("share of the step's wall time with 0 / 1 / 2+ ops running: "
        + " / ".join(f"{100 * share.get(k, 0.0):.0f} %" for k in ("0", "1", "2+")))
  out = {"benchmark": "step_profile", "batch": args.batch, "seq_len": args.seq_len,
         "jax": jax.__version__, "cpu_devices": jax.device_count(),
         "timed": timed, "profile": prof}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
