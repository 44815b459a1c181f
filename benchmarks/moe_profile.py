"""Where the dropless MoE step's extra time goes as routed experts grow: `moe_scaling.py`'s step
at 8 and 64 experts, each traced with jax.profiler and summed by XLA:CPU op kind.

    python benchmarks/moe_profile.py     # prints a table, writes results/moe_profile.json

The model, batch and step are `moe_scaling.py`'s (`Case`: the tiny MoE with top-2 of n routed
experts at a fixed expert width, 16 x 128 tokens, SFT with MTP, AdamW; `--impl`, default the
shipped `blocked` path). Each case is compiled and run once, then `--traced` steps are traced
(`step_profile.op_summary`). The table lists the op kinds by how much thread time per step they
add from the small case to the large one, which says what `moe_scaling`'s ratio is made of.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.moe_scaling import Case  # noqa: E402
from benchmarks.step_profile import traced_ops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "moe_profile.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--experts", default="8,64")
  ap.add_argument("--impl", default="blocked")
  ap.add_argument("--traced", type=int, default=5)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()
  small, large = (int(e) for e in args.experts.split(","))
  profs = {}
  for e in (small, large):
    case = Case(args.impl, e, None)
    case.run_step()
    profs[e] = traced_ops(case.run_step, args.traced, args.traced)
  kinds = {e: {k["kind"]: k for k in p["by_kind"]} for e, p in profs.items()}
  names = set(kinds[small]) | set(kinds[large])
  zero = {"ms_per_step": 0.0, "ops_per_step": 0.0}
  rows = sorted(({"kind": n,
                  "small_ms": kinds[small].get(n, zero)["ms_per_step"],
                  "large_ms": kinds[large].get(n, zero)["ms_per_step"],
                  "small_ops": kinds[small].get(n, zero)["ops_per_step"],
                  "large_ops": kinds[large].get(n, zero)["ops_per_step"]} for n in names),
                key=lambda r: r["small_ms"] - r["large_ms"])
  ps, pl = profs[small], profs[large]
  print(f"tiny MoE SFT step ({args.impl}, 16 x 128 tokens), {small} vs {large} routed experts, "
        f"jax {jax.__version__}")
  for e, p in profs.items():
    share = p["wall_share_by_ops_running"]
    print(f"  {e:3d} experts: {p['step_wall_ms']:.1f} ms wall per step, {p['ops_per_step']:.0f} "
          f"ops, {p['op_thread_ms_per_step']:.1f} ms op thread time; 0 / 1 / 2+ ops running: "
          + " / ".join(f"{100 * share.get(k, 0.0):.0f} %" for k in ("0", "1", "2+")))
  print(f"  wall ratio {pl['step_wall_ms'] / ps['step_wall_ms']:.2f}, op thread time ratio "
        f"{pl['op_thread_ms_per_step'] / ps['op_thread_ms_per_step']:.2f}")
  print(f"  {'op kind':34s} {'ms ' + str(small):>8s} {'ms ' + str(large):>8s} {'added':>7s} "
        f"{'ops ' + str(small):>7s} {'ops ' + str(large):>7s}")
  for r in rows[:12]:
    print(f"  {r['kind']:34s} {r['small_ms']:8.2f} {r['large_ms']:8.2f} "
          f"{r['large_ms'] - r['small_ms']:+7.2f} {r['small_ops']:7.0f} {r['large_ops']:7.0f}")
  out = {"benchmark": "moe_profile", "impl": args.impl, "experts": [small, large],
         "traced": args.traced, "jax": jax.__version__, "profiles": {str(e): p for e, p in
                                                                    profs.items()},
         "by_kind_added": rows}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
