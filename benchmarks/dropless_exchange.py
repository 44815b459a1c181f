"""The dropless expert exchange on a simulated mesh: the tiny MoE's SFT step over 8 host devices
(data 2 x expert 4), without fast buffers (each device pair's exact bound, n * min(k, E_loc)
rows) and with `dropless_fast_factor` f (model/moe/dispatch.py `_dropless`).

    python benchmarks/dropless_exchange.py [--steps 8] [--factors 1.0,1.5,2.0,4.0]
                                           [--dispatch all_to_all,ragged_all_to_all]

Per dispatch and setting, from the same start: the losses of `--steps` AdamW steps, which must
equal the exact bound's (neither the fast buffers nor the token slices drop anything); the mean
number of exchanges per MoE layer and step, run one after another (`moe_exchange_rounds`: 1 where
the routing fit the fast buffers, else the token slices it took); XLA's compiled memory of the
step (temporaries); and the
median step time. The router starts random and is trained for only these steps; a pretrained
router routes otherwise. The times are 8 simulated devices on the host's cores: they say what
each setting costs in XLA:CPU, not on a GPU. Not in run_all: a check, not a headline. Prints a
table; writes benchmarks/results/dropless_exchange.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import provenance  # noqa: E402
from r1jax import dry_run, model, parallel, run_config, train  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "dropless_exchange.json"
B, T = 16, 128  # 2048 tokens: 256 per device, a mean of 128 rows per device pair (top-2, ep 4)
MESH = dict(data=2, expert=4)


def _batch(vocab: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, vocab, (B, T)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def run(dispatch: str, factor: float | None, steps: int, mesh):
  cfg = ModelConfig.from_config(run_config.tiny_moe_fields(
      expert_dispatch=dispatch, dropless_fast_factor=factor))
  optim = run_config.base_config().optim
  optim.update(lr=1e-3, warmup_steps=0, schedule="constant")
  tx, lr = train.make_optimizer(optim, 1000)
  step = jax.jit(train.make_step(train.sft_loss(cfg, mtp_weight=0.3), tx, lr, bias_gamma=1e-3,
                                 jit=False), donate_argnums=(0,))
  shardings = jax.tree.map(lambda x: x.sharding, dry_run.abstract_state(cfg, tx, mesh))
  state = jax.device_put(train.create(model.init(cfg, jax.random.key(0)), tx, 0), shardings)
  batch = parallel.shard_batch(_batch(cfg.vocab_size), mesh)
  losses, rounds, dropped, times = [], [], [], []
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
      losses.append(float(metrics["loss"]))
      rounds.append(float(metrics.get("moe_exchange_rounds", 1.0)))
      dropped.append(float(metrics["moe_drop_frac"]))
  return dict(dispatch=dispatch, dropless_fast_factor=factor, losses=losses,
              moe_exchange_rounds=rounds, moe_drop_frac_max=max(dropped), temp_bytes=int(temp),
              step_ms=statistics.median(times[1:] or times) * 1e3)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--factors", default="1.0,1.5,2.0,4.0")
  ap.add_argument("--dispatch", default="all_to_all,ragged_all_to_all")
  args = ap.parse_args()
  mesh = parallel.make_mesh(MESH)
  factors = [None] + [float(f) for f in args.factors.split(",")]
  rows = []
  for dispatch in args.dispatch.split(","):
    group = [run(dispatch, f, args.steps, mesh) for f in factors]
    exact = np.asarray(group[0]["losses"])
    for r in group:
      r["max_loss_diff_vs_exact"] = float(np.max(np.abs(np.asarray(r["losses"]) - exact)))
      r["temp_ratio_vs_exact"] = r["temp_bytes"] / group[0]["temp_bytes"]
    rows += group
  print(f"tiny MoE SFT step, {B}x{T} tokens, top-2 of 16 experts, mesh {MESH} "
        f"({jax.device_count()} simulated devices), {args.steps} steps from the same start")
  print(f"{'dispatch':<18}{'fast f':>7}{'exchanges':>10}{'drop':>6}{'|dloss| max':>12}"
        f"{'temp MiB':>10}{'vs exact':>9}{'step ms':>9}")
  for r in rows:
    f = "exact" if r["dropless_fast_factor"] is None else f"{r['dropless_fast_factor']:.1f}"
    print(f"{r['dispatch']:<18}{f:>7}{np.mean(r['moe_exchange_rounds']):>10.2f}"
          f"{r['moe_drop_frac_max']:>6.0f}{r['max_loss_diff_vs_exact']:>12.1e}"
          f"{r['temp_bytes'] / 2**20:>10.1f}{r['temp_ratio_vs_exact']:>9.2f}{r['step_ms']:>9.1f}")
  provenance.write_result(RESULTS, dict(batch=[B, T], mesh=MESH, steps=args.steps,
                                        jax=jax.__version__, cpu_count=os.cpu_count(),
                                        rows=rows))


if __name__ == "__main__":
  main()
