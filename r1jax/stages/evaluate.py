"""Evaluation on held-out problems: greedy accuracy, pass@1 over k samples, cons@k (majority
vote), each overall and per bucket (e.g. problems the cold-start traces covered vs not)."""

from __future__ import annotations

import collections

import jax
import numpy as np

from r1jax.data import pipeline
from r1jax.data import template as template_lib
from r1jax.rollout import rewards, sampler
from r1jax.rollout._verify import extract_answer
from r1jax.stages import common


def encode_prompts(ctx: common.Context, records, template: str) -> list[list[int]]:
  tok = ctx.tokenizer
  return [tok.encode(template_lib.format_prompt(r["question"], template, tok.markers))
          for r in records]


def generate_texts(ctx: common.Context, cfg, params, prompts, *, rng, batch_size: int,
                   max_new_tokens: int, **sampling):
  """Completions (text) and their token rollouts, in fixed-size batches (one compile)."""
  texts, rollouts = [], []
  n = len(prompts)
  for i in range(0, n, batch_size):
    chunk = prompts[i:i + batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - real)  # pad: keeps the compiled shape
    with jax.set_mesh(ctx.mesh):
      out = sampler.generate(params, cfg, chunk, max_new_tokens=max_new_tokens,
                             rng=jax.random.fold_in(rng, i), eos_id=ctx.tokenizer.eos_id,
                             pad_id=ctx.tokenizer.pad_id,
                             vocab_limit=ctx.tokenizer.vocab_size, **sampling)
    for b in range(real):
      ids = out.completion[b, :int(out.lengths[b])]
      texts.append(ctx.tokenizer.decode(list(ids), skip_special=False))
      rollouts.append((out, b))
  return texts, rollouts


def evaluate(ctx: common.Context, cfg, params, records, *, seed: int, template: str,
             eval_cfg, stage: str | None = None) -> dict:
  """{accuracy (greedy), pass@1 (mean over k samples), pass@k (any of k right), cons@k,
  num_problems, by_bucket: {bucket: same}}. With `stage`, the greedy completions go to
  samples/eval_<stage>.jsonl (question, answer, completion, correct, bucket)."""
  bs = int(eval_cfg.get("batch_size", 64))
  prompts = encode_prompts(ctx, records, template)
  prompt_texts = [template_lib.format_prompt(r["question"], template, ctx.tokenizer.markers)
                  for r in records]
  answers = [r["answer"] for r in records]
  rng = jax.random.PRNGKey(seed)
  acc_fn = rewards.get("accuracy")
  out: dict = {"num_problems": len(records)}
  per_problem = {}
  if eval_cfg.get("greedy", True):
    texts, _ = generate_texts(ctx, cfg, params, prompts, rng=rng, batch_size=bs,
                              max_new_tokens=int(eval_cfg.max_new_tokens), greedy=True)
    per_problem["accuracy"] = _scores(acc_fn, prompt_texts, texts, answers)
    if stage is not None and ctx.is_main:
      pipeline.write_jsonl(ctx.workdir / "samples" / f"eval_{stage}.jsonl", [
          {"question": r["question"], "answer": r["answer"], "completion": t,
           "correct": bool(ok), "bucket": r.get("bucket")}
          for r, t, ok in zip(records, texts, per_problem["accuracy"])])
  k = int(eval_cfg.get("k", 0))
  if k > 0:
    rep = [p for p in prompts for _ in range(k)]
    texts, _ = generate_texts(ctx, cfg, params, rep, rng=jax.random.fold_in(rng, 1),
                              batch_size=bs, max_new_tokens=int(eval_cfg.max_new_tokens),
                              temperature=float(eval_cfg.temperature),
                              top_p=float(eval_cfg.top_p))
    correct = _scores(acc_fn, [p for p in prompt_texts for _ in range(k)], texts,
                      [a for a in answers for _ in range(k)])
    correct = correct.reshape(len(records), k)
    per_problem["pass@1"] = correct.mean(1)
    per_problem["pass@k"] = correct.max(1)  # any of the k samples right: what RL can sharpen
    votes = []
    for i in range(len(records)):
      extracted = [extract_answer(t) for t in texts[i * k:(i + 1) * k]]
      counts = collections.Counter(a for a in extracted if a is not None)
      if not counts:
        votes.append(0.0)
        continue
      top = counts.most_common(1)[0][0]
      votes.append(float(correct[i, extracted.index(top)]))
    per_problem["cons@k"] = np.asarray(votes)
  for key, vals in per_problem.items():
    out[key] = float(np.mean(vals))
  buckets = sorted({r.get("bucket") for r in records if r.get("bucket")})
  if buckets:
    out["by_bucket"] = {
        b: {key: float(np.mean([v for v, r in zip(vals, records) if r.get("bucket") == b]))
            for key, vals in per_problem.items()} for b in buckets}
  return out


def _scores(fn, prompts, texts, answers):
  vals = fn(prompts, texts, answer=answers)
  return np.asarray([0.0 if v is None else float(v) for v in vals])


def run_eval(ctx: common.Context, name: str, stage_cfg):
  which = stage_cfg.get("model", "policy")
  cfg, params = ctx.models[which]
  return {}, evaluate(ctx, cfg, params, ctx.splits["eval"], seed=ctx.seed(name),
                      template=stage_cfg.get("template", ctx.config.data.template),
                      eval_cfg=common.merged(ctx.config.eval, stage_cfg), stage=name)
