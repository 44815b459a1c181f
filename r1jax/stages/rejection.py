"""Rejection sampling: k answers per prompt from the current policy; keep the correct, readable
ones (deduplicated, at most `keep_per_prompt` each) as an SFT dataset at samples/<stage>.jsonl.

Stage fields: num_prompts, k, max_new_tokens, temperature, top_p, reward_weights (each listed
reward must reach `min_reward`, default 1.0: e.g. accuracy and format), max_chars (readability:
drop rambling completions), keep_per_prompt, template.
"""

from __future__ import annotations

import jax
import numpy as np

from r1jax.data import pipeline
from r1jax.data import template as template_lib
from r1jax.rollout import rewards
from r1jax.stages import common, evaluate


def run_rejection(ctx: common.Context, name: str, s):
  c = ctx.config
  cfg, params = ctx.models["policy"]
  k = int(s.get("k", 4))
  records = ctx.splits["rl"][:int(s.get("num_prompts", 256))]
  template = s.get("template", c.data.template)
  prompt_texts = [template_lib.format_prompt(r["question"], template, ctx.tokenizer.markers)
                  for r in records for _ in range(k)]
  prompts = [ctx.tokenizer.encode(p) for p in prompt_texts]
  texts, _ = evaluate.generate_texts(
      ctx, cfg, params, prompts, rng=jax.random.PRNGKey(ctx.seed(name)),
      batch_size=int(s.get("batch_size", 64)), max_new_tokens=int(s.get("max_new_tokens", 64)),
      temperature=float(s.get("temperature", 1.0)), top_p=float(s.get("top_p", 1.0)))
  texts = [t.replace(ctx.tokenizer.decode([ctx.tokenizer.eos_id]), "") for t in texts]
  answers = [r["answer"] for r in records for _ in range(k)]
  names = list(s.get("reward_weights", {"accuracy": 1.0, "format": 1.0}))
  scores = {n: rewards.get(n)(prompt_texts, texts, answer=answers) for n in names}
  min_reward, max_chars = float(s.get("min_reward", 1.0)), int(s.get("max_chars", 10_000))
  keep_per = int(s.get("keep_per_prompt", 1))
  kept, seen = [], set()
  per_prompt = np.zeros(len(records), np.int32)
  for i, text in enumerate(texts):
    p = i // k
    ok = all((scores[n][i] or 0.0) >= min_reward for n in names) and len(text) <= max_chars
    if not ok or (p, text) in seen or per_prompt[p] >= keep_per:
      continue
    seen.add((p, text))
    per_prompt[p] += 1
    kept.append({"question": records[p]["question"], "completion": text,
                 "answer": records[p]["answer"], "bucket": records[p].get("bucket")})
  path = ctx.workdir / "samples" / f"{name}.jsonl"
  if ctx.is_main:
    pipeline.write_jsonl(path, kept)
  common.barrier(f"{name}: samples written")  # the next stage may read them on any process
  metrics = {"num_samples": len(texts), "num_kept": len(kept),
             "acceptance": len(kept) / max(len(texts), 1),
             "prompts_with_a_sample": float(np.mean(per_prompt > 0))}
  for n in names:
    metrics[f"reward_{n}"] = float(np.mean([v or 0.0 for v in scores[n]]))
  ctx.log.metrics(name, 0, metrics)
  ctx.log.info(f"[{name}] kept {len(kept)} of {len(texts)} samples -> {path}")
  return metrics
