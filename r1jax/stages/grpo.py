"""The GRPO stage: sample G completions per prompt, score them with rule rewards, and update the
policy on group-normalized advantages (`mu` updates per rollout batch).

Stage fields: prompts_per_step, group_size, max_new_tokens, temperature, top_p, reward_weights
{name: weight}, loss_type (grpo|bnpo|dr_grpo|dapo), eps_low, eps_high, beta (KL; 0 keeps no
reference model), ref_refresh_every, mu, advantage_scale (group|batch|none), dynamic_sampling
(DAPO: replace zero-variance groups with fresh prompts, up to max_refills tries),
mask_truncated, template, and optim overrides (lr, ...).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from r1jax import flops, train
from r1jax.data import pipeline
from r1jax.data import template as template_lib
from r1jax.rollout import rewards, sampler
from r1jax.stages import common
from r1jax.train import grpo as grpo_lib


def rollout_batch(rollout, *, mask_truncated: bool):
  """Sampler output -> GRPO batch fields (module docstring of r1jax.train.grpo)."""
  toks = np.asarray(rollout.tokens)
  B, L = toks.shape
  N = rollout.completion.shape[1]
  P = L - N
  t = np.arange(L)[None, :]
  pad = (P - np.asarray(rollout.prompt_lengths))[:, None]
  end = P + np.asarray(rollout.lengths)[:, None]
  real = (t >= pad) & (t < end)
  is_completion = (t >= P) & (t < end)
  if mask_truncated:
    is_completion &= ~np.asarray(rollout.truncated)[:, None]
  old = np.zeros((B, L), np.float32)
  old[:, P:] = np.asarray(rollout.logprobs)
  return dict(tokens=toks[:, :-1].astype(np.int32), targets=toks[:, 1:].astype(np.int32),
              segment_ids=real[:, :-1].astype(np.int32),
              positions=np.maximum(t - pad, 0)[:, :-1].astype(np.int32),
              loss_mask=is_completion[:, 1:].astype(np.float32), old_logprobs=old[:, 1:])


def score(ctx: common.Context, records, rollout, weights, prompt_texts):
  """Decoded completions, total rewards [B] and per-function means."""
  tok = ctx.tokenizer
  texts = [tok.decode(list(rollout.completion[b, :int(rollout.lengths[b])]), skip_special=True)
           for b in range(rollout.completion.shape[0])]
  total, per_fn, errors = rewards.combine(
      dict(weights), prompt_texts, texts, answer=[r.get("answer") for r in records],
      completion_lengths=[int(x) for x in rollout.lengths])
  means = {f"reward_{k}": float(np.mean([0.0 if v is None else v for v in vals]))
           for k, vals in per_fn.items()}
  means.update({f"reward_errors_{k}": float(v) for k, v in errors.items() if v})
  for bucket in sorted({r.get("bucket") for r in records if r.get("bucket")}):
    rows = [i for i, r in enumerate(records) if r.get("bucket") == bucket]
    for k, vals in per_fn.items():
      means[f"reward_{k}_{bucket}"] = float(np.mean([vals[i] or 0.0 for i in rows]))
  return texts, np.asarray(total, np.float32), means


def run_grpo(ctx: common.Context, name: str, s):
  c = ctx.config
  cfg, params = ctx.models["policy"]
  steps = common.stage_steps(ctx, s)
  P, G = int(s.prompts_per_step), int(s.group_size)
  N = int(s.max_new_tokens)
  template = s.get("template", c.data.template)
  weights = dict(s.get("reward_weights", {"accuracy": 1.0, "format": 0.5}))
  for w in weights:
    rewards.get(w)  # unknown names fail before any compile
  mu, refresh = int(s.get("mu", 1)), int(s.get("ref_refresh_every", 0))
  tx, lr = train.make_optimizer(common.merged(c.optim, s), steps * mu)
  beta = float(s.get("beta", 0.0))
  loss = grpo_lib.grpo_loss(cfg, loss_type=s.get("loss_type", "grpo"),
                            eps_low=float(s.get("eps_low", 0.2)),
                            eps_high=float(s.get("eps_high", 0.2)), beta=beta, budget=N)
  step_fn = train.make_step(loss, tx, lr, bias_gamma=float(c.train.bias_gamma) if cfg.is_moe
                            else 0.0, nonfinite=c.train.nonfinite)
  state = {"train": common.new_state(ctx, params, tx, name),
           "ref": params if beta > 0 else None}
  seed = ctx.seed(name)
  it = pipeline.prompt_batches(ctx.splits["rl"], batch_size=P, seed=seed)
  dynamic, max_refills = bool(s.get("dynamic_sampling", False)), int(s.get("max_refills", 2))
  sampling = dict(max_new_tokens=N, temperature=float(s.get("temperature", 1.0)),
                  top_p=float(s.get("top_p", 1.0)), eos_id=ctx.tokenizer.eos_id,
                  pad_id=ctx.tokenizer.pad_id, vocab_limit=ctx.tokenizer.vocab_size)
  samples_path = ctx.workdir / "samples" / f"{name}.jsonl"
  samples = _earlier_samples(samples_path) if ctx.is_main else []

  def sample(st, records, key):
    prompt_texts = [template_lib.format_prompt(r["question"], template, ctx.tokenizer.markers)
                    for r in records for _ in range(G)]
    prompts = [ctx.tokenizer.encode(p) for p in prompt_texts]
    with jax.set_mesh(ctx.mesh):
      out = sampler.generate(train.full_params(st["train"]), cfg, prompts, rng=key, **sampling)
    grouped = [r for r in records for _ in range(G)]
    texts, total, means = score(ctx, grouped, out, weights, prompt_texts)
    B, L = out.tokens.shape
    gen_flops[0] += flops.generate_flops(cfg, B, L - N, int(np.max(out.lengths)))
    return out, texts, total, means

  gen_flops = [0.0]  # model FLOPs of this step's generation (with refills)

  def next_batch(st):
    t0 = time.time()
    gen_flops[0] = 0.0
    step = int(st["train"].step)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    records = next(it)
    group_records = list(records)  # the prompt of each group, as refills swap groups in
    out, texts, total, means = sample(st, records, key)
    fresh_reward = float(total.mean())  # on-policy: before dynamic sampling swaps groups in
    adv, zero_var = grpo_lib.group_advantages(total, G, s.get("advantage_scale", "group"))
    refills = 0
    while dynamic and zero_var.any() and refills < max_refills:
      # DAPO dynamic sampling: groups with equal rewards carry no signal; resample them
      refills += 1
      fresh = next(it)
      out2, texts2, total2, _ = sample(st, fresh, jax.random.fold_in(key, 1000 + refills))
      if out2.tokens.shape != out.tokens.shape:
        continue  # a different prompt bucket: rows cannot be swapped in
      _, zv2 = grpo_lib.group_advantages(total2, G)
      for i, j in refill_pairs(zero_var, zv2):
        rows = slice(i * G, (i + 1) * G)
        src = slice(j * G, (j + 1) * G)
        out = _replace_rows(out, out2, rows, src)
        total[rows] = total2[src]
        texts[rows] = texts2[src]
        group_records[i] = fresh[j]
      adv, zero_var = grpo_lib.group_advantages(total, G, s.get("advantage_scale", "group"))
    batch = rollout_batch(out, mask_truncated=bool(s.get("mask_truncated", False)))
    batch["advantages"] = adv
    if ctx.is_main and step % max(int(c.log.every_steps), 1) == 0:
      # written as they come, so a run resumed from a checkpoint keeps the samples before it
      samples[:] = [x for x in samples if x["step"] < step]
      samples.append({"step": step, "question": group_records[0]["question"],
                      "completion": texts[0],
                      "reward": float(total[0])})
      pipeline.write_jsonl(samples_path, samples)
    lengths = np.asarray(out.lengths)
    host = dict(reward=fresh_reward, reward_trained=float(total.mean()),
                reward_std=float(total.std()),
                completion_len=float(lengths.mean()), completion_len_max=float(lengths.max()),
                truncated_frac=float(np.mean(out.truncated)), zero_var_groups=float(zero_var.mean()),
                refills=float(refills), rollout_seconds=time.time() - t0,
                rollout_tokens_per_sec=float(lengths.sum()) / max(time.time() - t0, 1e-9))
    host.update(means)
    B, T = batch["tokens"].shape
    host["flops"] = gen_flops[0] + mu * flops.train_flops(cfg, B * T, T) + (
        flops.forward_flops(cfg, B * T, T) if beta > 0 else 0.0)
    return common.shard(ctx, batch), host

  def update(st, batch):
    train_state, metrics = st["train"], None
    for _ in range(mu):
      train_state, metrics = step_fn(train_state, batch, st["ref"])
    ref = st["ref"]
    if ref is not None and refresh and int(train_state.step) % refresh == 0:
      ref = train.full_params(train_state)
    return {"train": train_state, "ref": ref}, metrics

  with jax.set_mesh(ctx.mesh):
    state, metrics = common.train_loop(ctx, name, state, steps=steps, next_batch=next_batch,
                                       data_iter=it, update=update, log_keys=("reward", "loss"))
  ctx.models["policy"] = (cfg, train.full_params(state["train"]))
  return metrics


def refill_pairs(zero_var, candidate_zero_var) -> list[tuple[int, int]]:
  """DAPO dynamic sampling's swap: (slot, candidate) group pairs giving each zero-variance slot,
  in order, the next freshly sampled group whose rewards vary. Every mixed candidate is used
  while slots remain, so one refill batch fills as many slots as it has mixed groups."""
  slots = np.flatnonzero(np.asarray(zero_var))
  mixed = np.flatnonzero(~np.asarray(candidate_zero_var))
  return list(zip(slots.tolist(), mixed.tolist()))


def _earlier_samples(path) -> list[dict]:
  """The samples an interrupted earlier attempt at the stage wrote ([] if none)."""
  if not path.exists():
    return []
  with path.open() as f:
    return [json.loads(line) for line in f if line.strip()]


def _replace_rows(out, other, rows, src):
  fields = {}
  for k in ("tokens", "completion", "logprobs", "completion_mask", "lengths", "truncated",
            "prompt_lengths"):
    a = np.array(getattr(out, k))
    a[rows] = np.asarray(getattr(other, k))[src]
    fields[k] = a
  return type(out)(**fields)
