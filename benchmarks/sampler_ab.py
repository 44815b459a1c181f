"""The sampler at two commits, interleaved: commit OLD (a git worktree) against the working tree,
at `rollout.py`'s model and shapes, with the same prompts, weights and key.

    python benchmarks/sampler_ab.py OLD_COMMIT        # writes results/sampler_ab.json

Each round runs one child process per side, OLD first, then the working tree. A child loads its
own tree's r1jax, compiles each shape, times `--calls` generate calls, and hashes the tokens and
log-probs it sampled. In round 1 it also traces one call (`step_profile.traced_ops`, from the
child's tree) for the ops per decode step. The table gives each side's median ms per decode step
over all rounds, the ops per step, and whether both sides sampled the very same tokens and
log-probs. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sampler_ab.json"

# runs in a child process whose cwd is the tree under test: argv = shapes, calls, trace (0/1)
CHILD = r"""
import hashlib, json, os, sys, time
sys.path.insert(0, ".")
import jax, numpy as np
import r1jax
assert r1jax.__file__.startswith(os.getcwd()), r1jax.__file__  # this tree's r1jax, not pip's
from benchmarks.rollout import tiny_config
from benchmarks.step_profile import traced_ops
from r1jax import model
from r1jax.rollout import sampler
cfg = tiny_config()
params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
out = []
for shape in sys.argv[1].split(","):
  B, N = (int(v) for v in shape.split("x"))
  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, 16)).tolist()
  def call():
    return sampler.generate(params, cfg, prompts, max_new_tokens=N, rng=jax.random.key(0),
                            temperature=1.0, eos_id=None)
  r = call()  # compile
  digest = hashlib.sha256(np.asarray(r.completion).tobytes()
                          + np.asarray(r.logprobs).tobytes()).hexdigest()[:16]
  times = []
  for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  row = {"shape": shape, "steps": N, "times_s": times, "sha": digest}
  if sys.argv[3] == "1":
    prof = traced_ops(call, 1, N, whole=True)
    row.update(ops_per_step=prof["ops_per_step"], op_thread_ms=prof["op_thread_ms_per_step"])
  out.append(row)
print("RESULT " + json.dumps(out))
"""


def run_child(tree: pathlib.Path, shapes: str, calls: int, trace: bool) -> list[dict]:
  proc = subprocess.run([sys.executable, "-c", CHILD, shapes, str(calls), str(int(trace))],
                        cwd=tree, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    sys.exit(f"sampler_ab: the child in {tree} failed:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("old", help="the commit to compare the working tree with")
  ap.add_argument("--shapes", default="128x40,16x128")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--calls", type=int, default=3, help="timed generate calls per child")
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  old_commit = subprocess.run(["git", "rev-parse", args.old], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
  sides = {"old": [], "new": []}
  with tempfile.TemporaryDirectory() as tmp:
    old_tree = pathlib.Path(tmp) / "old"
    subprocess.run(["git", "worktree", "add", "-f", "-q", "--detach", str(old_tree), old_commit],
                   cwd=ROOT, check=True)
    try:
      for rnd in range(args.rounds):
        for side, tree in (("old", old_tree), ("new", ROOT)):
          rows = run_child(tree, args.shapes, args.calls, trace=rnd == 0)
          sides[side].append(rows)
          print(f"round {rnd + 1} {side}: " + ", ".join(
              f"{r['shape']} {1e3 * statistics.median(r['times_s']) / r['steps']:.2f} ms/step"
              for r in rows), flush=True)
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT)

  table = []
  for i, shape in enumerate(args.shapes.split(",")):
    row = {"shape": shape}
    for side, rounds in sides.items():
      times = [t for rows in rounds for t in rows[i]["times_s"]]
      first = rounds[0][i]
      row[side] = {"ms_per_step": 1e3 * statistics.median(times) / first["steps"],
                   "times_s": times, "ops_per_step": first["ops_per_step"],
                   "op_thread_ms_per_step": first["op_thread_ms"],
                   "sha": sorted({rows[i]["sha"] for rows in rounds})}
    row["speedup"] = row["old"]["ms_per_step"] / row["new"]["ms_per_step"]
    row["same_tokens_and_logprobs"] = row["old"]["sha"] == row["new"]["sha"] and len(
        row["new"]["sha"]) == 1
    table.append(row)

  print(f"\nsampler at {old_commit[:7]} (old) and the working tree (new), rollout.py's tiny MoE, "
        f"{args.rounds} interleaved rounds x {args.calls} calls")
  print(f"{'shape':>9s} {'old ms/step':>12s} {'new ms/step':>12s} {'speed-up':>9s} "
        f"{'old ops':>8s} {'new ops':>8s}  same tokens and log-probs")
  for r in table:
    print(f"{r['shape']:>9s} {r['old']['ms_per_step']:12.2f} {r['new']['ms_per_step']:12.2f} "
          f"{r['speedup']:8.2f}x {r['old']['ops_per_step']:8.0f} {r['new']['ops_per_step']:8.0f}"
          f"  {r['same_tokens_and_logprobs']}")
  out = {"benchmark": "sampler_ab", "old_commit": old_commit, "rounds": args.rounds,
         "calls": args.calls, "rows": table}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
