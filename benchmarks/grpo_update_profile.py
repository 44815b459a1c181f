"""Where r1jax's GRPO update spends its time on XLA:CPU at `grpo_vs_trl.py`'s shape: a
jax.profiler trace of the update step, summed.

    python benchmarks/grpo_update_profile.py   # prints a table, writes results/grpo_update_profile.json

The model, prompts, rewards and step are `grpo_vs_trl.py`'s r1jax side (`R1jaxGRPO`: the tiny
MoE, dropless, 16 prompts x 8 completions x 40 tokens after 16-token prompts, the grpo loss,
AdamW): one rollout is sampled and scored, then its update step is run once (compile), timed
`--runs` times and traced `--traced` times (`step_profile.op_summary`). The update is the half of
the GRPO step where r1jax is slower than TRL (`grpo_vs_trl.json`); this says where its time goes.
The same update with `share_prompt` (each group's prompt run once; off by default) is timed
round-robin beside it, from the same starting state, and its first loss compared.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks import grpo_vs_trl as gvt  # noqa: E402
from benchmarks.step_profile import traced_ops  # noqa: E402
from r1jax import model  # noqa: E402
from r1jax.data.tokenizer import CharTokenizer  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402
from r1jax.stages.grpo import grpo_batch  # noqa: E402
from r1jax.train.losses import grpo as grpo_lib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "grpo_update_profile.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=40)
  ap.add_argument("--runs", type=int, default=7)
  ap.add_argument("--traced", type=int, default=3)
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()
  a = argparse.Namespace(loss_type="grpo", epsilon=0.2, lr=1e-4, group=args.group,
                         new_tokens=args.new_tokens)

  tok = CharTokenizer()
  prompts = gvt.make_prompts(args.prompts, args.prompt_len)
  cfg = gvt.tiny_config(None)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  job = gvt.R1jaxGRPO(cfg, params, tok, prompts, a)
  out = sampler.generate(params, cfg, job.prompt_ids, max_new_tokens=a.new_tokens,
                         rng=jax.random.key(0), temperature=1.0, eos_id=None, pad_id=tok.pad_id,
                         vocab_limit=tok.vocab_size)
  rewards = gvt.digit_fraction([tok.decode(c, skip_special=True) for c in out.completion])
  adv, _ = grpo_lib.group_advantages(rewards, a.group, "group")
  batch = grpo_batch(out, adv, mask_truncated=False)
  # the same update with each group's prompt run once (`share_prompt`, off by default): a second
  # job, so each side steps its own state from the same start
  shared_job = gvt.R1jaxGRPO(cfg, jax.tree.map(lambda x: x.copy(), params), tok, prompts, a)
  shared_batch = grpo_batch(out, adv, mask_truncated=False, share_prompt=args.group)
  states = {"whole": job.state, "shared": shared_job.state}
  first_loss = {}

  def stepper(name, fn, b):
    def step():
      states[name], metrics = fn(states[name], b)
      first_loss.setdefault(name, float(jax.block_until_ready(metrics["loss"])))
    return step

  step = stepper("whole", job.step_fn, batch)
  shared_step = stepper("shared", shared_job.step_fn, shared_batch)
  step()  # compiles
  shared_step()
  times, shared_times = [], []
  for _ in range(args.runs):  # round-robin, one of each per round
    for fn, ts in ((step, times), (shared_step, shared_times)):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  prof = traced_ops(step, args.traced, args.traced)
  B, T = batch.tokens.shape
  seconds = statistics.median(times)
  print(f"r1jax GRPO update, tiny MoE, {B} rows x {T} positions ({args.prompts} prompts x "
        f"{args.group} x {args.new_tokens} new tokens), jax {jax.__version__}")
  print(f"  median {1e3 * seconds:.1f} ms over {args.runs} steps; traced {prof['steps']} steps of "
        f"{prof['step_wall_ms']:.1f} ms wall, {prof['ops_per_step']:.0f} ops, "
        f"{prof['op_thread_ms_per_step']:.1f} ms of op thread time each")
  for k in prof["by_kind"][:12]:
    print(f"    {k['kind']:32s} {k['ms_per_step']:7.2f} ms  x{k['ops_per_step']:5.0f}")
  share = prof["wall_share_by_ops_running"]
  print("  share of the step's wall time with 0 / 1 / 2+ ops running: "
        + " / ".join(f"{100 * share.get(k, 0.0):.0f} %" for k in ("0", "1", "2+")))
  shared_seconds = statistics.median(shared_times)
  loss_diff = abs(first_loss["whole"] - first_loss["shared"])
  print(f"  with share_prompt ({shared_batch.tokens.shape[1]} positions per row after a "
        f"{shared_batch.prefix_tokens.shape[1]}-token prompt run once per group): median "
        f"{1e3 * shared_seconds:.1f} ms against {1e3 * seconds:.1f} ms whole rows, timed "
        f"round-robin: {seconds / shared_seconds:.2f}x; first-step loss difference "
        f"{loss_diff:.1e}")
  result = {"benchmark": "grpo_update_profile", "rows": B, "positions": T,
            "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens,
            "jax": jax.__version__, "seconds": seconds, "runs_s": times, "profile": prof,
            "share_prompt": {"seconds": shared_seconds, "runs_s": shared_times,
                             "positions": int(shared_batch.tokens.shape[1]),
                             "prefix_positions": int(shared_batch.prefix_tokens.shape[1]),
                             "speedup": seconds / shared_seconds,
                             "first_step_loss_difference": loss_diff},
}
  provenance.write_result(args.out, result)


if __name__ == "__main__":
  main()
