"""Evaluation on held-out problems: greedy accuracy, pass@1 over k samples, cons@k (majority
vote), each overall and per bucket (e.g. problems the cold-start traces covered vs not)."""

from __future__ import annotations

import collections

import jax
import numpy as np

from r1jax.data import pipeline
from r1jax.rollout import engine
from r1jax.rollout._verify import extract_answer
from r1jax.stages import common


def evaluate(ctx: common.Context, cfg, params, records, *, seed: int, template: str,
             eval_cfg, stage: str | None = None) -> dict:
  """{accuracy (greedy), pass@1 (mean over k samples), pass@k (any of k right), cons@k,
  num_problems, by_bucket: {bucket: same}}. With `stage`, the greedy completions go to
  samples/eval_<stage>.jsonl (question, answer, completion, correct, bucket).

  eval_cfg.draft "mtp": a model with an MTP module decodes speculatively, its MTP module
  drafting (greedy: the same tokens; sampled: the same distribution), and `draft_accept_rate`
  joins the results; a model without one (a dense student) decodes plainly."""
  bs = int(eval_cfg.get("batch_size", 64))
  draft = str(eval_cfg.get("draft", "")) if cfg.num_nextn_predict_layers else ""
  rng = jax.random.PRNGKey(seed)
  run = lambda sampling, repeats, key: engine.rollout(
      params, cfg, records, tokenizer=ctx.tokenizer, mesh=ctx.mesh, template=template,
      sampling=sampling, rng=key, repeats=repeats, batch_size=bs,
      reward_weights={"accuracy": 1.0})
  out: dict = {"num_problems": len(records)}
  drafts = []
  per_problem = {}
  if eval_cfg.get("greedy", True):
    greedy = run(engine.Sampling(max_new_tokens=int(eval_cfg.max_new_tokens), greedy=True,
                                 draft=draft), 1, rng)
    drafts.append(greedy.drafts)
    per_problem["accuracy"] = greedy.rewards.astype(np.float64)
    if stage is not None and ctx.is_main:
      pipeline.write_jsonl(ctx.workdir / "samples" / f"eval_{stage}.jsonl", [
          {"question": r["question"], "answer": r["answer"], "completion": t,
           "correct": bool(ok), "bucket": r.get("bucket")}
          for r, t, ok in zip(records, greedy.completions, per_problem["accuracy"])])
  k = int(eval_cfg.get("k", 0))
  if k > 0:
    sampled = run(engine.Sampling(max_new_tokens=int(eval_cfg.max_new_tokens),
                                  temperature=float(eval_cfg.temperature),
                                  top_p=float(eval_cfg.top_p), draft=draft), k,
                  jax.random.fold_in(rng, 1))
    drafts.append(sampled.drafts)
    correct = sampled.rewards.astype(np.float64).reshape(len(records), k)
    per_problem["pass@1"] = correct.mean(1)
    per_problem["pass@k"] = correct.max(1)  # any of the k samples right: what RL can sharpen
    votes = []
    for i in range(len(records)):
      extracted = [extract_answer(t) for t in sampled.completions[i * k:(i + 1) * k]]
      counts = collections.Counter(a for a in extracted if a is not None)
      if not counts:
        votes.append(0.0)
        continue
      top = counts.most_common(1)[0][0]
      votes.append(float(correct[i, extracted.index(top)]))
    per_problem["cons@k"] = np.asarray(votes)
  for key, vals in per_problem.items():
    out[key] = float(np.mean(vals))
  accepted, proposed = np.sum(drafts, axis=0) if drafts else (0, 0)
  if proposed:
    out["draft_accept_rate"] = float(accepted / proposed)
  buckets = sorted({r.get("bucket") for r in records if r.get("bucket")})
  if buckets:
    out["by_bucket"] = {
        b: {key: float(np.mean([v for v, r in zip(vals, records) if r.get("bucket") == b]))
            for key, vals in per_problem.items()} for b in buckets}
  return out


def run_eval(ctx: common.Context, name: str, s):
  cfg, params = ctx.models[s.model]
  return {}, evaluate(ctx, cfg, params, ctx.splits["eval"], seed=ctx.seed(name),
                      template=s.template or ctx.config.data.template,
                      eval_cfg=common.merged(ctx.config.eval, s.overrides), stage=name)
