"""A/B: r1jax's sampler on a 1-device and a 2-device host mesh (the batch split over both CPU
cores), at `rollout.py`'s tiny MoE and shapes.

    python benchmarks/rollout_mesh_ab.py   # prints a table, writes results/rollout_mesh_ab.json

XLA:CPU runs each small op on one thread (`rollout_profile.py`), so this asks whether giving each
core its own device, with half the batch each, runs the decode step on both cores. Per shape: a
compile call on each mesh, then `--rounds` round-robin rounds of one call on each; the table gives
the medians and whether both meshes sampled the same tokens.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")  # before jax loads

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.rollout import tiny_config  # noqa: E402
from r1jax import model  # noqa: E402
from r1jax.parallel import make_mesh  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rollout_mesh_ab.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="128x40,16x128")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  cfg = tiny_config()
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  meshes = {"1 device": make_mesh({"data": 1}, jax.devices()[:1]),
            "2 devices": make_mesh({"data": 2})}
  rows = []
  for shape in args.shapes.split(","):
    B, N = (int(v) for v in shape.split("x"))
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, 16)).tolist()

    def call(mesh):
      with jax.set_mesh(mesh):
        return sampler.generate(params, cfg, prompts, max_new_tokens=N, rng=jax.random.key(0),
                                temperature=1.0, eos_id=None)

    outs = {name: call(mesh) for name, mesh in meshes.items()}  # compiles
    same = bool(np.array_equal(outs["1 device"].completion, outs["2 devices"].completion))
    times = {name: [] for name in meshes}
    for _ in range(args.rounds):
      for name, mesh in meshes.items():
        t0 = time.perf_counter()
        call(mesh)
        times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows.append({"batch": B, "new_tokens": N, "seconds": med, "runs_s": times,
                 "speedup": med["1 device"] / med["2 devices"], "same_tokens": same})

  print(f"r1jax sampler, rollout.py's tiny MoE, 1-device vs 2-device host mesh, medians of "
        f"{args.rounds} round-robin calls, jax {jax.__version__}")
  print(f"{'shape':>9s} {'1 device s':>11s} {'2 devices s':>12s} {'speed-up':>9s}  same tokens")
  for r in rows:
    print(f"{r['batch']:4d}x{r['new_tokens']:<4d} {r['seconds']['1 device']:11.3f} "
          f"{r['seconds']['2 devices']:12.3f} {r['speedup']:8.2f}x  {r['same_tokens']}")
  out = {"benchmark": "rollout_mesh_ab", "rounds": args.rounds, "jax": jax.__version__,
         "rows": rows}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
