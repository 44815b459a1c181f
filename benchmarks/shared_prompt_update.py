"""The GRPO update with each group's prompt run once (`share_prompt`), against whole rows, at
r1_zero_smollm2's shape.

    python benchmarks/shared_prompt_update.py   # prints a table, writes results/shared_prompt_update.json

SmolLM2-135M-Instruct with the config's LoRA (rank 16 on every attention and MLP projection), 8
of the task's word problems in the shipped R1-Zero chat prompt, 4 samples each (T=0.8, up to 64
new tokens, stopping at EOS): one real rollout, from which both batches are built
(`stages.grpo.grpo_batch`, length_bucket 16, as the config does). For each completion budget
(the rollout as sampled, and its first 16 tokens, the length the run's completions settle at),
the LoRA train step of the stage (`train.make_step` over the dr_grpo loss) is timed on the whole
rows and on the shared-prompt batch, round-robin, one call of each per round after a compile call
of each; the table gives the medians. The losses and gradient norms of the two are compared too.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.shared_prefill import smollm2_prompts  # noqa: E402
from r1jax import train  # noqa: E402
from r1jax.model import lora  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402
from r1jax.stages import grpo as grpo_stage  # noqa: E402
from r1jax.train import state as state_lib  # noqa: E402
from r1jax.train.losses import grpo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "shared_prompt_update.json"


def _truncate(r: sampler.Rollout, n: int) -> sampler.Rollout:
  """The rollout with every completion cut to its first n tokens."""
  P = r.tokens.shape[1] - r.completion.shape[1]
  lengths = np.minimum(np.asarray(r.lengths), n)
  return dataclasses.replace(
      r, tokens=np.asarray(r.tokens)[:, :P + n], completion=np.asarray(r.completion)[:, :n],
      logprobs=np.asarray(r.logprobs)[:, :n], completion_mask=np.asarray(r.completion_mask)[:, :n],
      lengths=lengths, truncated=np.zeros_like(np.asarray(r.truncated)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  cfg, params, tok, ids = smollm2_prompts(args.prompts, args.group)
  rollout = sampler.generate(params, cfg, ids, rng=jax.random.PRNGKey(0),
                             max_new_tokens=args.new_tokens, eos_id=tok.eos_id,
                             pad_id=tok.pad_id, vocab_limit=tok.vocab_size, temperature=0.8)
  adv = np.random.default_rng(0).normal(size=len(ids)).astype(np.float32)
  lora_cfg = lora.LoraConfig(rank=16, alpha=32.0)
  adapters = lora.init(cfg, lora_cfg, params, jax.random.PRNGKey(1))
  tx = optax.adam(3e-4)
  loss = grpo.grpo_loss(cfg, loss_type="dr_grpo", eps_low=0.2, eps_high=0.28, beta=0.0,
                        budget=args.new_tokens, temperature=0.8)
  step = train.make_step(loss, tx, donate=False)
  state = state_lib.create(params, tx, 0, adapters=adapters, lora_cfg=lora_cfg)

  rows = []
  budgets = [("as sampled", rollout), ("first 16 tokens", _truncate(rollout, 16))]
  for label, r in budgets:
    batches = {share: grpo_stage.grpo_batch(r, adv, mask_truncated=False, length_bucket=16,
                                            share_prompt=args.group if share else 0)
               for share in (False, True)}
    first = {s: jax.device_get(step(state, b)[1]) for s, b in batches.items()}  # compile
    times = {False: [], True: []}
    for _ in range(args.rounds):
      for share, b in batches.items():
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, b))
        times[share].append(time.perf_counter() - t0)
    med = {s: statistics.median(t) for s, t in times.items()}
    P = int(r.tokens.shape[1] - r.completion.shape[1])
    rows.append({"completions": label, "prompt_len": P,
                 "update_columns": int(batches[False].tokens.shape[1] + 1),
                 "mean_completion": float(np.mean(r.lengths)),
                 "whole_rows_s": med[False], "shared_prompt_s": med[True],
                 "runs_whole_s": times[False], "runs_shared_s": times[True],
                 "speedup": med[False] / med[True],
                 "loss_diff": abs(float(first[True]["loss"]) - float(first[False]["loss"])),
                 "grad_norm_rel_diff": abs(float(first[True]["grad_norm"]) /
                                           float(first[False]["grad_norm"]) - 1)})
  print(f"SmolLM2-135M-Instruct + LoRA rank 16, GRPO update of {args.prompts} prompts x "
        f"{args.group} samples, CPU, jax {jax.__version__}")
  print(f"{'completions':16s} {'prompt':>6s} {'columns':>7s} {'whole rows s':>12s} "
        f"{'shared prompt s':>15s} {'speed-up':>8s} {'|loss diff|':>11s} {'grad-norm rel':>13s}")
  for x in rows:
    print(f"{x['completions']:16s} {x['prompt_len']:6d} {x['update_columns']:7d} "
          f"{x['whole_rows_s']:12.2f} {x['shared_prompt_s']:15.2f} {x['speedup']:7.2f}x "
          f"{x['loss_diff']:11.1e} {x['grad_norm_rel_diff']:13.1e}")
  result = {"model": "SmolLM2-135M-Instruct", "lora_rank": 16, "prompts": args.prompts,
            "group": args.group, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "jax": jax.__version__, "results": rows}
  provenance.write_result(args.out, result)


if __name__ == "__main__":
  main()
