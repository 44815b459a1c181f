"""SFT training speed on CPU, as users get it: r1jax (its jitted step, and its launcher) vs
transformers' DeepseekV3ForCausalLM, each at its defaults.

  python benchmarks/train_step.py          # writes benchmarks/results/train_step.json

Both sides train the same tiny DeepSeek-V3 (r1jax.run_config.tiny_moe_fields() without MTP, ~1.6M
parameters) from the same weights (ours written with r1jax.hf.save and read by transformers'
from_pretrained, checked by a logits comparison), float32, AdamW (lr 1e-3, betas 0.9/0.95,
grad-norm clip 1.0 on both). Defaults on each side:
- r1jax: the shipped MoE path (`moe_impl="blocked"`, dropless: capacity_factor None); XLA:CPU's
  own thread pool.
- transformers: its default experts implementation and attention, torch's default thread count,
  OpenMP's default wait policy (nothing set here; `--hf_experts`, `--torch_threads` and the
  environment can change them, and the JSON records what ran).
Rows, each on batch `--batch` x `--seq_len` tokens per step:
- "r1jax launcher": `python -m r1jax.launch --config configs/sft_tiny.py` (MTP off, so both sides
  do the same work) on its own arithmetic data, packed to the same batch shape; the median
  `step_seconds` of metrics.jsonl after `--launcher_skip` steps. This is what a user's SFT stage
  runs at, data pipeline and logging included.
- "r1jax make_step": the jitted step alone on a fixed random batch.
- transformers: `loss.backward()` + `clip_grad_norm_` + `optimizer.step()` on the same batch.
Throughput is batch tokens per second of step wall time, median of `--runs` timed steps after
`--warmup` steps. The headline ratio is the launcher's against transformers'.
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
from benchmarks import provenance  # noqa: E402
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


def time_round_robin(fns, warmup: int, runs: int) -> list[list[float]]:
  """Each function's step times, timed one step of each per round."""
  for _ in range(warmup):
    for f in fns:
      f()
  times = [[] for _ in fns]
  for _ in range(runs):
    for f, out in zip(fns, times):
      t0 = time.perf_counter()
      f()
      out.append(time.perf_counter() - t0)
  return times


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


def launcher_row(args) -> dict:
  """The launcher's SFT stage on configs/sft_tiny.py at the benchmark's batch shape, MTP off."""
  import subprocess
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, "-m", "r1jax.launch", "--config", str(ROOT / "configs" / "sft_tiny.py"),
           "--workdir", work, "--config.train.mtp_weight=0.0",
           f"--config.data.batch_size={args.batch}", f"--config.data.seq_len={args.seq_len}",
           f"--config.stages.sft.steps={args.launcher_steps}", "--config.eval.max_new_tokens=1",
           "--config.data.num_eval_problems=1", "--config.log.every_steps=1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    times = [r["step_seconds"] for r in recs if r.get("stage") == "sft" and "step_seconds" in r]
  timed = times[args.launcher_skip:]
  seconds = statistics.median(timed)
  return {"name": "r1jax launcher (configs/sft_tiny.py, MTP off)", "seconds": seconds,
          "tokens_per_s": args.batch * args.seq_len / seconds, "first_step_s": times[0],
          "runs_s": timed, "process_wall_s": wall, "command": " ".join(cmd[1:])}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32, help="configs/sft_tiny.py's batch")
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--runs", type=int, default=15)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--capacity_factor", type=float, default=None,
                  help="r1jax's expert capacity (default: dropless, as shipped)")
  ap.add_argument("--moe_impl", default="blocked", help="r1jax's MoE path (default: as shipped)")
  ap.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--hf_experts", default="default",
                  choices=("default", "eager", "batched_mm", "grouped_mm"),
                  help="transformers' experts implementation (default: its own default)")
  ap.add_argument("--launcher_steps", type=int, default=40)
  ap.add_argument("--launcher_skip", type=int, default=5, help="untimed launcher steps")
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  import torch
  import transformers
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  hf_kwargs = {} if args.hf_experts == "default" else {"experts_implementation": args.hf_experts}

  cfg = tiny_config(args.capacity_factor, args.moe_impl)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  batch = make_batch(cfg, args.batch, args.seq_len)

  with tempfile.TemporaryDirectory() as tmp:
    hf.save(tmp, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32, **hf_kwargs)
  hf_experts = getattr(hf_model.config, "_experts_implementation", None) or args.hf_experts
  hf_model.eval()
  with torch.no_grad():
    hf_logits = hf_model(torch.as_tensor(batch["tokens"][:2], dtype=torch.long)).logits.numpy()
  parity = float(np.abs(hf_logits - np.asarray(model.forward(
      params, jnp.asarray(batch["tokens"][:2]), cfg.replace(capacity_factor=None)))).max())
  assert parity < 1e-3, f"transformers and r1jax disagree on the same weights: {parity}"

  rows = [launcher_row(args)]
  first_losses, steps = {}, {}
  copy = lambda: jax.tree.map(lambda a: a.copy(), params)  # the step donates its state
  scan_cfg = cfg.replace(scan_layers=True)
  for name, make in (("r1jax make_step (jit, sft_loss, AdamW)",
                      lambda: r1jax_step(cfg, copy(), batch, args.lr)),
                     ("transformers DeepseekV3 (backward + AdamW)",
                      lambda: torch_step(hf_model, batch, args.lr)),
                     ("r1jax make_step, layers under lax.scan (scan_layers=True)",
                      lambda: r1jax_step(scan_cfg, copy(), batch, args.lr))):
    once = steps[name] = make()
    t0 = time.perf_counter()
    first_losses[name] = once()  # the first step (includes our compile), timed separately
    rows.append({"name": name, "first_step_s": time.perf_counter() - t0})
  # round-robin, one step of each per round: this machine's speed drifts by 10-20 % over a
  # minute, which would otherwise land on whichever row ran during a slow spell
  times = time_round_robin(list(steps.values()), max(args.warmup - 1, 0), args.runs)
  for row, all_times in zip(rows[1:], times):
    seconds = statistics.median(all_times)
    row.update(seconds=seconds, tokens_per_s=args.batch * args.seq_len / seconds,
               runs_s=all_times)
  ratio = rows[0]["tokens_per_s"] / rows[2]["tokens_per_s"]
  step_ratio = rows[1]["tokens_per_s"] / rows[2]["tokens_per_s"]
  loss_gap = abs(list(first_losses.values())[0] - list(first_losses.values())[1])
  scan_ratio = rows[3]["seconds"] / rows[1]["seconds"]

  print(f"tiny DeepSeek-V3 ({n_params / 1e6:.2f}M params, no MTP, r1jax moe_impl "
        f"{args.moe_impl}, capacity_factor {args.capacity_factor}), SFT step on batch "
        f"{args.batch} x {args.seq_len}, CPU ({os.cpu_count()} cores), jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, experts {hf_experts}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), transformers "
        f"{transformers.__version__}; logits parity {parity:.1e}, first-step loss gap "
        f"{loss_gap:.1e}")
  print(f"{'':44s} {'median s':>9s} {'tokens/s':>10s} {'1st step s':>11s}")
  for r in rows:
    print(f"{r['name']:44s} {r['seconds']:9.3f} {r['tokens_per_s']:10.0f} "
          f"{r['first_step_s']:11.2f}   runs: {' '.join(f'{t:.2f}' for t in r['runs_s'])}")
  print(f"{'ratio (r1jax launcher / transformers)':44s} {'':9s} {ratio:9.2f}x   (target >= 1.3x)")
  print(f"{'ratio (r1jax make_step / transformers)':44s} {'':9s} {step_ratio:9.2f}x")
  print(f"{'step time, lax.scan layers / shipped loop':44s} {'':9s} {scan_ratio:9.2f}x")

  result = {"model": "r1jax.run_config.tiny_moe_fields(), no MTP", "params": n_params,
            "moe_impl": args.moe_impl, "capacity_factor": args.capacity_factor,
            "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
            "runs": args.runs, "logits_parity": parity, "first_step_loss_gap": loss_gap,
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "hf_experts_implementation": hf_experts,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "results": rows, "ratio": ratio, "ratio_basis": "r1jax launcher / transformers",
            "step_ratio": step_ratio, "scan_over_loop_step_time": scan_ratio,
            "target_ratio": 1.3}
  provenance.write_result(args.out, result)


if __name__ == "__main__":
  main()
