"""SFT train-step throughput on CPU: r1jax's jitted step vs transformers' DeepseekV3ForCausalLM.

  python benchmarks/train_step.py          # writes benchmarks/results/train_step.json

Both sides train the same tiny DeepSeek-V3 (r1jax.run_config.tiny_moe_fields(): ~1.6M parameters
without MTP; our capacity-buffer experts with capacity_factor 2.0), starting from the same weights
(ours written with r1jax.hf.save and read by transformers' from_pretrained, checked by a logits
comparison), on the same batch (16 x 128 tokens, the first quarter of each row masked as prompt),
float32, AdamW (lr 1e-3, betas 0.9/0.95, grad-norm clip 1.0 on both). One step = forward, masked
token cross-entropy, backward, optimizer update: r1jax.train.make_step with sft_loss (no MTP, no
balance loss; it also applies the aux-loss-free bias update) vs `loss.backward()` +
`clip_grad_norm_` + `optimizer.step()`. Throughput is batch tokens per second of wall time,
median of `--runs` timed steps after `--warmup` steps (which include our compile). torch uses 2
threads (`--torch_threads`, OMP_WAIT_POLICY=PASSIVE unless set); XLA:CPU uses its default
thread pool (the host's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from r1jax import hf, model, run_config, train  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.train import state as state_lib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"


def tiny_config(capacity_factor: float, moe_impl: str) -> ModelConfig:
  return ModelConfig.from_config(run_config.tiny_moe_fields(
      capacity_factor=capacity_factor, moe_impl=moe_impl, num_nextn_predict_layers=0))


def make_batch(cfg: ModelConfig, B: int, T: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  seq = rng.integers(2, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[:, : T // 4] = 0  # a prompt to mask
  return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def time_steps(step_once, warmup: int, runs: int):
  for _ in range(warmup):
    step_once()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    step_once()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def optim_config(lr: float):
  c = run_config.base_config().optim
  c.update(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1.0,
           b1=0.9, b2=0.95, eps=1e-8)
  return c


def r1jax_step(cfg, params, batch, lr):
  tx, sched = train.make_optimizer(optim_config(lr), total_steps=1000)
  state = state_lib.create(params, tx, seed=0)
  step = train.make_step(train.sft_loss(cfg), tx, sched, bias_gamma=1e-3)
  batch = jax.tree.map(jnp.asarray, batch)
  holder = {"state": state}

  def once():
    holder["state"], metrics = step(holder["state"], batch)
    return float(jax.block_until_ready(metrics["loss"]))
  return once


def torch_step(hf_model, batch, lr):
  import torch
  inputs = torch.as_tensor(batch["tokens"], dtype=torch.long)
  targets = torch.as_tensor(batch["targets"], dtype=torch.long)
  mask = torch.as_tensor(batch["loss_mask"])
  opt = torch.optim.AdamW(hf_model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0)
  hf_model.train()

  def once():
    opt.zero_grad(set_to_none=True)
    logits = hf_model(inputs).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1), reduction="none")
    loss = (nll * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
    opt.step()
    return loss.item()
  return once


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--capacity_factor", type=float, default=2.0)
  ap.add_argument("--moe_impl", default="capacity")
  ap.add_argument("--torch_threads", type=int, default=2)
  # transformers 5's MoE kernels; "eager" (a loop over the hit experts) is its fastest on CPU
  # for this model (see benchmarks/rollout.py)
  ap.add_argument("--hf_experts", default="eager", choices=("eager", "batched_mm", "grouped_mm"))
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  # torch's OpenMP threads spin-wait at barriers; on a shared (oversubscribed) CPU that made its
  # step time swing 0.3 s .. 19 s between runs. Passive waiting keeps it stable.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch
  import transformers
  torch.set_num_threads(args.torch_threads)

  cfg = tiny_config(args.capacity_factor, args.moe_impl)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  batch = make_batch(cfg, args.batch, args.seq_len)

  with tempfile.TemporaryDirectory() as tmp:
    hf.save(tmp, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32, experts_implementation=args.hf_experts)
  hf_model.eval()
  with torch.no_grad():
    hf_logits = hf_model(torch.as_tensor(batch["tokens"][:2], dtype=torch.long)).logits.numpy()
  parity = float(np.abs(hf_logits - np.asarray(model.forward(
      params, jnp.asarray(batch["tokens"][:2]), cfg.replace(capacity_factor=None)))).max())
  assert parity < 1e-3, f"transformers and r1jax disagree on the same weights: {parity}"

  rows = []
  first_losses = {}
  for name, make in (("r1jax make_step (jit, sft_loss, AdamW)",
                      lambda: r1jax_step(cfg, params, batch, args.lr)),
                     ("transformers DeepseekV3 (backward + AdamW)",
                      lambda: torch_step(hf_model, batch, args.lr))):
    once = make()
    t0 = time.perf_counter()
    first_losses[name] = once()  # the first step (includes our compile), timed separately
    first_s = time.perf_counter() - t0
    seconds, all_times = time_steps(once, max(args.warmup - 1, 0), args.runs)
    rows.append({"name": name, "seconds": seconds,
                 "tokens_per_s": args.batch * args.seq_len / seconds,
                 "first_step_s": first_s, "runs_s": all_times})
  ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
  loss_gap = abs(list(first_losses.values())[0] - list(first_losses.values())[1])

  print(f"tiny DeepSeek-V3 ({n_params / 1e6:.2f}M params, no MTP, capacity_factor "
        f"{args.capacity_factor}), SFT step on batch {args.batch} x {args.seq_len}, CPU "
        f"({os.cpu_count()} cores), jax {jax.__version__}, torch {torch.__version__} "
        f"({args.torch_threads} threads), transformers {transformers.__version__}; logits parity "
        f"{parity:.1e}, first-step loss gap {loss_gap:.1e}")
  print(f"{'':44s} {'median s':>9s} {'tokens/s':>10s} {'1st step s':>11s}")
  for r in rows:
    print(f"{r['name']:44s} {r['seconds']:9.3f} {r['tokens_per_s']:10.0f} "
          f"{r['first_step_s']:11.2f}   runs: {' '.join(f'{t:.2f}' for t in r['runs_s'])}")
  print(f"{'ratio (r1jax / transformers)':44s} {'':9s} {ratio:9.2f}x   (target >= 2x)")

  result = {"model": "r1jax.run_config.tiny_moe_fields(), no MTP", "params": n_params,
            "moe_impl": args.moe_impl, "capacity_factor": args.capacity_factor,
            "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
            "runs": args.runs, "logits_parity": parity, "first_step_loss_gap": loss_gap,
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": args.torch_threads,
            "cpu_count": os.cpu_count(), "hf_experts_implementation": args.hf_experts,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "results": rows, "ratio": ratio, "target_ratio": 2.0}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
