"""Why speculative rollouts are slower on XLA:CPU: a jax.profiler trace of one generate call
with plain decoding and one with the MTP draft (`draft="mtp"`), summed per decode step.

    python benchmarks/speculative_profile.py   # prints a table, writes results/speculative_profile.json

configs/tiny_moe.py (with its MTP module) at random weights, 16-token prompts in runs of 8 (a
GRPO group's shared prefill), exactly N new tokens (no stop token), temperature 1, at
`--shapes` (rows x N). Random weights give near-uniform distributions, which the draft matches
often (the acceptance is printed); the trained policy's is in speculative.json. For each side:
the median of `--runs` timed calls after a compile call, then one traced call: per decode step
its wall time, ops, op thread time, and the matmul fusions' share (`step_profile.op_summary`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.step_profile import traced_ops  # noqa: E402
from r1jax import model  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "speculative_profile.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="128x40,16x128")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()
  spec = importlib.util.spec_from_file_location("tiny_moe", ROOT / "configs" / "tiny_moe.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = ModelConfig.from_config(mod.get_config().model)
  params = model.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = []
  for shape in args.shapes.split(","):
    B, N = map(int, shape.split("x"))
    G = 8 if B % 8 == 0 and B > 16 else 1
    prompts = [p for p in rng.integers(2, cfg.vocab_size, (B // G, 16)).tolist()
               for _ in range(G)]
    for draft in ("", "mtp"):
      def call():
        return sampler.generate(params, cfg, prompts, max_new_tokens=N, rng=jax.random.key(0),
                                eos_id=None, draft=draft)
      out = call()  # compile
      times = []
      for _ in range(args.runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
      steps = out.decode_steps if draft else N - 1
      summary = traced_ops(call, 1, steps, whole=True)
      matmul = sum(k["ms_per_step"] for k in summary["by_kind"] if k["kind"] == "ynn_fusion")
      rows.append(dict(
          shape=shape, draft=draft or "none", call_s=statistics.median(times),
          decode_steps=steps,
          accept_rate=(out.draft_accepted / out.draft_proposed) if draft else None,
          traced_ms_per_step=summary["step_wall_ms"], ops_per_step=summary["ops_per_step"],
          op_thread_ms_per_step=summary["op_thread_ms_per_step"],
          matmul_fusion_ms_per_step=matmul))
      print(rows[-1], flush=True)
  print(f"\n{'shape':>7} {'draft':>5} {'call s':>7} {'steps':>5} {'accept':>6} "
        f"{'ops/step':>8} {'op ms/step':>10} {'matmul ms/step':>14}")
  for r in rows:
    acc = f"{r['accept_rate']:.3f}" if r["accept_rate"] is not None else "-"
    print(f"{r['shape']:>7} {r['draft']:>5} {r['call_s']:7.3f} {r['decode_steps']:5d} {acc:>6} "
          f"{r['ops_per_step']:8.0f} {r['op_thread_ms_per_step']:10.2f} "
          f"{r['matmul_fusion_ms_per_step']:14.2f}")
  provenance.write_result(args.out, dict(
      benchmark="speculative_profile", jax=importlib.metadata.version("jax"),
      cpu_count=os.cpu_count(), runs=args.runs, rows=rows))


if __name__ == "__main__":
  main()
