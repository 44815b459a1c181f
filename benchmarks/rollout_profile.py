"""Where r1jax's sampler spends its time on XLA:CPU at `rollout.py`'s shapes: a jax.profiler
trace of one generate call, summed per decode step.

    python benchmarks/rollout_profile.py     # prints tables, writes results/rollout_profile.json

The model, prompts and sampling are `rollout.py`'s (configs/tiny_moe.py without MTP, 16-token
prompts, exactly N new tokens at temperature 1, the dropless MoE). For each shape (batch x N) the
script times `--runs` generate calls after a compile call (median), then traces one call and
reads the trace's XLA:CPU op events (prefill, the decode loop's body, sampling): ops and op
thread time per new token, by kind, and the share of the call's wall time during which 0, 1 or
2+ ops ran at once (`step_profile.op_summary`). It explains the gap to transformers' `generate`
in `rollout.json` the way step_profile.py does for the training step.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.rollout import tiny_config  # noqa: E402
from benchmarks.step_profile import traced_ops  # noqa: E402
from r1jax import model  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rollout_profile.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="128x40,16x128")
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  cfg = tiny_config()
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  shapes = []
  for shape in args.shapes.split(","):
    B, N = (int(v) for v in shape.split("x"))
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, args.prompt_len))

    def call():
      out = sampler.generate(params, cfg, prompts.tolist(), max_new_tokens=N,
                             rng=jax.random.key(0), temperature=1.0, eos_id=None)
      assert out.lengths.min() == N

    call()  # compile
    times = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
    prof = traced_ops(call, 1, N, whole=True)  # "per step" = per new token
    seconds = statistics.median(times)
    shapes.append({"batch": B, "new_tokens": N, "seconds": seconds, "runs_s": times,
                   "tokens_per_s": B * N / seconds, "ms_per_new_token": 1e3 * seconds / N,
                   "profile": prof})

  print(f"r1jax sampler, tiny DeepSeek-V3 (rollout.py's), prompt {args.prompt_len}, jax "
        f"{jax.__version__}, {jax.device_count()} CPU device(s)")
  for sh in shapes:
    p = sh["profile"]
    share = p["wall_share_by_ops_running"]
    print(f"{sh['batch']} x {sh['new_tokens']}: {sh['seconds']:.3f} s median "
          f"({sh['tokens_per_s']:.0f} new tok/s), {sh['ms_per_new_token']:.2f} ms per decode "
          f"step; traced: {p['step_wall_ms']:.2f} ms per step, {p['ops_per_step']:.0f} ops and "
          f"{p['op_thread_ms_per_step']:.2f} ms of op thread time per step")
    for k in p["by_kind"][:10]:
      print(f"    {k['kind']:32s} {k['ms_per_step']:7.3f} ms  x{k['ops_per_step']:5.1f}")
    print("    share of the wall time with 0 / 1 / 2+ ops running: "
          + " / ".join(f"{100 * share.get(k, 0.0):.0f} %" for k in ("0", "1", "2+")))
  out = {"benchmark": "rollout_profile", "prompt_len": args.prompt_len, "jax": jax.__version__,
         "cpu_devices": jax.device_count(), "shapes": shapes}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
