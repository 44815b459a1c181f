"""MoE scaling on CPU: the tiny MoE's SFT step as n_routed_experts grows with top-k fixed.

    python benchmarks/moe_scaling.py [--experts 8,16,32,64] [--impls blocked,capacity]
                                     [--capacity_factor 1.25] [--rounds 7]

The default is the shipped path: "blocked" experts, dropless (0 dropped assignments by
construction). `--impls capacity` with `--capacity_factor` times the capacity-buffer path, which
drops assignments beyond its buffers (the drop % column says how many).

Sparse compute means the cost per token stays flat as experts are added (only the optimizer
update grows with the total parameter count). For each E it times the full train step
(forward + backward + AdamW + bias update) and, separately, forward + backward alone, so the
optimizer's share is visible. Steps are timed round-robin over the configs (one step of each per
round, median over rounds) so background load on a shared machine hits every config alike.
Prints a table with the ratio to the first (8-expert) run; writes
benchmarks/results/moe_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import provenance  # noqa: E402
from r1jax import model, run_config, train  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "moe_scaling.json"
B, T = 16, 128  # 2048 tokens per step


def _batch(vocab: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, vocab, (B, T)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
          "loss_mask": jnp.ones((B, T), jnp.float32),
          "segment_ids": jnp.ones((B, T), jnp.int32),
          "positions": jnp.asarray(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)))}


class Case:
  """One (impl, E) configuration: compiled step and compiled forward+backward."""

  def __init__(self, impl: str, experts: int, capacity_factor: float | None):
    self.impl, self.experts = impl, experts
    self.cfg = ModelConfig.from_config(run_config.tiny_moe_fields(
        n_routed_experts=experts, n_group=4, topk_group=2, moe_impl=impl,
        capacity_factor=capacity_factor if impl == "capacity" else None))
    optim = run_config.base_config().optim
    optim.update(lr=1e-3, warmup_steps=0, schedule="constant")
    tx, lr = train.make_optimizer(optim, 1000)
    loss = train.sft_loss(self.cfg, mtp_weight=0.3)
    params = model.init(self.cfg, jax.random.key(0))
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    self.state = train.create(params, tx, 0)
    self.batch = _batch(self.cfg.vocab_size)
    self.step = train.make_step(loss, tx, lr, bias_gamma=1e-3)
    grad = jax.jit(jax.grad(lambda p, b: loss(p, b, None, None)[0]))
    self.grad = lambda: grad(train.full_params(self.state), self.batch)
    t0 = time.perf_counter()
    self.run_step()
    self.compile_s = time.perf_counter() - t0
    jax.block_until_ready(self.grad())
    self.step_s, self.grad_s, self.drop = [], [], []

  def run_step(self):
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return metrics

  def time_once(self):
    t0 = time.perf_counter()
    metrics = self.run_step()
    self.step_s.append(time.perf_counter() - t0)
    self.drop.append(float(metrics.get("moe_drop_frac", 0.0)))
    t0 = time.perf_counter()
    jax.block_until_ready(self.grad())
    self.grad_s.append(time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--experts", default="8,16,32,64")
  ap.add_argument("--impls", default="blocked")
  ap.add_argument("--capacity_factor", type=float, default=1.25)
  ap.add_argument("--rounds", type=int, default=7)
  args = ap.parse_args()
  experts = [int(e) for e in args.experts.split(",")]
  rows = []
  for impl in args.impls.split(","):
    cases = [Case(impl, e, args.capacity_factor) for e in experts]
    for _ in range(args.rounds):
      for c in cases:
        c.time_once()
    base_step = statistics.median(cases[0].step_s)
    base_grad = statistics.median(cases[0].grad_s)
    for c in cases:
      step_s, grad_s = statistics.median(c.step_s), statistics.median(c.grad_s)
      rows.append(dict(
          impl=impl, experts=c.experts, params_M=c.num_params / 1e6,
          capacity_factor=c.cfg.capacity_factor, step_ms=step_s * 1e3,
          step_ms_min=min(c.step_s) * 1e3, tokens_per_s=B * T / step_s,
          ratio=step_s / base_step, fwd_bwd_ms=grad_s * 1e3, fwd_bwd_ratio=grad_s / base_grad,
          optimizer_ms=max(step_s - grad_s, 0.0) * 1e3,
          drop_frac_mean=float(np.mean(c.drop)), compile_s=c.compile_s))
  header = (f"{'impl':<11}{'E':>4}{'params':>9}{'step ms':>9}{'tok/s':>9}{'ratio':>7}"
            f"{'fwd+bwd ms':>12}{'ratio':>7}{'opt ms':>8}{'drop %':>8}")
  print(f"tiny MoE SFT step, {B}x{T} tokens, top-{cases[0].cfg.num_experts_per_tok}, expert "
        f"width {cases[0].cfg.moe_intermediate_size}, {jax.devices()[0].platform}, "
        f"median of {args.rounds} round-robin steps")
  print(header)
  for r in rows:
    print(f"{r['impl']:<11}{r['experts']:>4}{r['params_M']:>8.2f}M{r['step_ms']:>9.1f}"
          f"{r['tokens_per_s']:>9.0f}{r['ratio']:>7.2f}{r['fwd_bwd_ms']:>12.1f}"
          f"{r['fwd_bwd_ratio']:>7.2f}{r['optimizer_ms']:>8.1f}{100 * r['drop_frac_mean']:>8.3f}")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(dict(
      batch=[B, T], platform=jax.devices()[0].platform, machine=platform.machine(),
      cpu_count=__import__("os").cpu_count(), jax=jax.__version__, rounds=args.rounds,
      rows=rows, **provenance.code()), indent=2))
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
