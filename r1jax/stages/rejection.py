"""Rejection sampling: k answers per prompt from the current policy; keep the correct, readable
ones (deduplicated, at most `keep_per_prompt` each) as an SFT dataset at samples/<stage>.jsonl,
and with `pairs` up to `pairs_per_prompt` (passing, failing) pairs of distinct answers of each
prompt that has both, as preference pairs at samples/<stage>_pairs.jsonl (a reward model's
data). Fields and defaults:
`r1jax.stages.configs.RejectionConfig`."""

from __future__ import annotations

import jax
import numpy as np

from r1jax.data import pipeline
from r1jax.rollout import engine
from r1jax.stages import common
from r1jax.stages.configs import RejectionConfig


def run_rejection(ctx: common.Context, name: str, s: RejectionConfig):
  c = ctx.config
  cfg, params = ctx.models["policy"]
  records = ctx.splits["rl"][:s.num_prompts]
  names = list(s.reward_weights)
  scored = engine.rollout(
      params, cfg, records, tokenizer=ctx.tokenizer, mesh=ctx.mesh,
      template=s.template or c.data.template,
      sampling=engine.Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                               top_p=s.top_p, draft=s.draft),
      rng=jax.random.PRNGKey(ctx.seed(name)), repeats=s.k, batch_size=s.batch_size,
      reward_weights={n: 1.0 for n in names})
  kept, seen = [], set()
  per_prompt = np.zeros(len(records), np.int32)
  passing, failing = {}, {}  # prompt -> its distinct passing / failing samples (pairs)
  for i, text in enumerate(scored.completions):
    p = i // s.k
    ok = all((scored.per_reward[n][i] or 0.0) >= s.min_reward for n in names) and \
        len(text) <= s.max_chars
    side = (passing if ok else failing).setdefault(p, [])
    if text not in side:
      side.append(text)
    if not ok or (p, text) in seen or per_prompt[p] >= s.keep_per_prompt:
      continue
    seen.add((p, text))
    per_prompt[p] += 1
    kept.append({"question": records[p]["question"], "completion": text,
                 "answer": records[p]["answer"], "bucket": records[p].get("bucket")})
  path = ctx.workdir / "samples" / f"{name}.jsonl"
  if ctx.is_main:
    pipeline.write_jsonl(path, kept)
  pairs = [{"question": records[p]["question"], "chosen": chosen, "rejected": rejected,
            "answer": records[p]["answer"]}
           for p in sorted(passing) if p in failing
           for chosen, rejected in _pairings(passing[p], failing[p], s.pairs_per_prompt)]
  if s.pairs and ctx.is_main:
    pipeline.write_jsonl(ctx.workdir / "samples" / f"{name}_pairs.jsonl", pairs)
  common.barrier(f"{name}: samples written")  # the next stage may read them on any process
  metrics = {"num_samples": scored.size, "num_kept": len(kept),
             "acceptance": len(kept) / max(scored.size, 1),
             "prompts_with_a_sample": float(np.mean(per_prompt > 0))}
  if s.pairs:
    metrics["num_pairs"] = float(len(pairs))
  for n in names:
    metrics[f"reward_{n}"] = float(np.mean([v or 0.0 for v in scored.per_reward[n]]))
  if scored.draft_accept_rate is not None:
    metrics["draft_accept_rate"] = scored.draft_accept_rate
  ctx.log.metrics(name, 0, metrics)
  ctx.log.info(f"[{name}] kept {len(kept)} of {scored.size} samples -> {path}")
  return metrics


def _pairings(passing: list, failing: list, n: int) -> list[tuple]:
  """Up to n (passing, failing) pairs, in order, each sample in as few pairs as possible: the
  i-th pair takes passing[i % P] and failing[i % F]."""
  return [(passing[i % len(passing)], failing[i % len(failing)])
          for i in range(min(n, len(passing) * len(failing)))]
