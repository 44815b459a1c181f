"""The GRPO stage: sample G completions per prompt, score them with rule rewards, and update the
policy on group-normalized advantages (`mu` updates per rollout batch). Fields and defaults:
`r1jax.stages.configs.GRPOConfig`.

The update scores the tokens with the policy that sampled them: the same model code, the same
dropless MoE and precision (`sampler.policy_config`), and with `routing_replay` the same experts.
The first update of every batch logs how far the two are apart (`logp_mismatch_*`,
`mismatch_ratio_*`, `mismatch_clip_frac`; r1jax.train.losses.grpo).

With `staleness=k` >= 1 (asynchronous GRPO) the rollout of step t+k is dispatched before update
t, from a copy of the policy before that update (on `rollout_devices` of its own, or on the run's
mesh), and collected at step t+k: k rollouts are in flight, each k updates behind the policy that
learns from it. The copies of the k rollouts in flight are part of the stage's checkpoint
(`behind`: the newest, `behind_j`: the j-th before it), and the prompt iterator is checkpointed
as it was before the oldest of them drew its prompts, so a resumed run samples the same batches
from the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import flops, parallel, train
from r1jax.data import pipeline
from r1jax.rollout import engine, partial, rewards, sampler
from r1jax.stages import common
from r1jax.stages.configs import GRPOConfig
from r1jax.train.losses import grpo as grpo_lib


def grpo_batch(rollout: sampler.Rollout, advantages, *, mask_truncated: bool,
               routing: bool = False, length_bucket: int = 0,
               share_prompt: int = 0) -> grpo_lib.GRPOBatch:
  """Sampler output -> the update's batch (host arrays; r1jax.train.losses.GRPOBatch).

  With `length_bucket` > 0 the batch ends after the longest completion, rounded up to a
  multiple of `length_bucket` tokens (at most max_new_tokens): the columns cut are padding in
  every row, and the model is causal, so the loss is the same and the update does less work.
  Each distinct length compiles the update once.

  With `share_prompt` = G > 0 the rows come in groups of G with one prompt (a GRPO group), and
  the update runs each group's prompt once: the batch's prefix fields hold the prompts but their
  last token, and its [B, T] fields the last prompt token and the completion (the positions whose
  targets are completion tokens). Same loss to float rounding."""
  if share_prompt > 0:
    assert not routing, "routing replay runs on whole rows (share_prompt needs it off)"
    full = grpo_batch(rollout, advantages, mask_truncated=mask_truncated,
                      length_bucket=length_bucket)
    return _split_prompt(full, rollout.tokens.shape[1] - rollout.completion.shape[1],
                         share_prompt)
  toks = np.asarray(rollout.tokens)
  B, L = toks.shape
  N = rollout.completion.shape[1]
  P = L - N
  if length_bucket > 0:
    longest = max(int(np.max(rollout.lengths)), 1)
    keep = P + min(N, -(-longest // length_bucket) * length_bucket)
    rollout = dataclasses.replace(
        rollout, tokens=toks[:, :keep], completion=rollout.completion[:, :keep - P],
        logprobs=np.asarray(rollout.logprobs)[:, :keep - P],
        completion_mask=np.asarray(rollout.completion_mask)[:, :keep - P],
        routing=None if rollout.routing is None else np.asarray(rollout.routing)[:, :keep])
    return grpo_batch(rollout, advantages, mask_truncated=mask_truncated, routing=routing)
  t = np.arange(L)[None, :]
  pad = (P - np.asarray(rollout.prompt_lengths))[:, None]
  end = P + np.asarray(rollout.lengths)[:, None]
  real = (t >= pad) & (t < end)
  is_completion = (t >= P) & (t < end)
  if mask_truncated:
    is_completion &= ~np.asarray(rollout.truncated)[:, None]
  logp = np.zeros((B, L), np.float32)
  logp[:, P:] = np.asarray(rollout.logprobs)
  return grpo_lib.GRPOBatch(
      tokens=toks[:, :-1].astype(np.int32), targets=toks[:, 1:].astype(np.int32),
      segment_ids=real[:, :-1].astype(np.int32),
      positions=np.maximum(t - pad, 0)[:, :-1].astype(np.int32),
      loss_mask=is_completion[:, 1:].astype(np.float32), rollout_logprobs=logp[:, 1:],
      old_logprobs=logp[:, 1:], advantages=np.asarray(advantages, np.float32),
      routing=(np.asarray(rollout.routing[:, :-1]) if routing and rollout.routing is not None
               else None))


ROW_FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "rollout_logprobs",
              "old_logprobs", "routing")  # GRPOBatch's fields with one entry per [B, T] position


def pad_columns(batch: grpo_lib.GRPOBatch, multiple: int) -> grpo_lib.GRPOBatch:
  """The batch with its [B, T] fields padded at the end to a multiple of `multiple` columns:
  `mesh.context` (twice that in the zigzag order, `parallel.position_multiple`), whose devices
  each take an equal share of every row's positions (context parallelism). The new columns are padding (segment 0, no loss, no expert); the model is
  causal and attends within a segment, so no real position sees them, and the loss, its
  gradient and the metrics are the same."""
  extra = -batch.tokens.shape[1] % multiple
  if extra == 0:
    return batch
  pad = lambda x: None if x is None else np.pad(
      np.asarray(x), [(0, 0), (0, extra)] + [(0, 0)] * (np.ndim(x) - 2))
  return dataclasses.replace(batch, **{f: pad(getattr(batch, f)) for f in ROW_FIELDS})


def _split_prompt(batch: grpo_lib.GRPOBatch, P: int, G: int) -> grpo_lib.GRPOBatch:
  """A whole-row batch whose rows are groups of G with the same P-token prompt -> the batch that
  runs each prompt once (`grpo_batch(share_prompt=G)`)."""
  B = batch.tokens.shape[0]
  assert B % G == 0, f"{B} rows are not groups of {G}"
  if P < 2:
    return batch  # a one-token prompt: nothing to share
  cut = P - 1  # the last prompt token predicts the first completion token: it stays per row
  prompts = batch.tokens[:, :cut].reshape(B // G, G, cut)
  assert (prompts == prompts[:, :1]).all(), "share_prompt: rows of a group differ in prompt"
  per_row = lambda x: None if x is None else x[:, cut:]
  return dataclasses.replace(
      batch, **{f: per_row(getattr(batch, f)) for f in ROW_FIELDS},
      prefix_tokens=batch.tokens[::G, :cut], prefix_positions=batch.positions[::G, :cut],
      prefix_valid=batch.segment_ids[::G, :cut])


def update_groups(zero_var: np.ndarray, min_groups: int = 2) -> np.ndarray:
  """The groups a `drop_zero_var` update keeps: every group with a reward spread, filled up
  with the first flat ones to a power-of-two count of at least `min_groups` (capped at all
  groups), so that the update compiles for a few batch sizes. Sorted group indices."""
  zero_var = np.asarray(zero_var, bool)
  n = len(zero_var)
  signal = np.flatnonzero(~zero_var)
  want = min(n, max(min_groups, 1 << max(len(signal) - 1, 0).bit_length()))
  fill = np.flatnonzero(zero_var)[:want - len(signal)]
  return np.sort(np.concatenate([signal, fill]))


def take_groups(rollout: sampler.Rollout, groups: np.ndarray, group_size: int
                ) -> sampler.Rollout:
  """The rows of `groups` (every per-row array of the rollout)."""
  rows = (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).reshape(-1)
  return dataclasses.replace(rollout, **{
      name: np.asarray(getattr(rollout, name))[rows] for name in sampler.row_fields(rollout)})


def update_loss(pcfg, s: GRPOConfig):
  """The stage's GRPO loss over `pcfg`, the sampler's policy config (the update scores with it)."""
  return grpo_lib.grpo_loss(pcfg, loss_type=s.loss_type, policy_loss=s.policy_loss,
                            eps_low=s.eps_low, eps_high=s.eps_high, beta=s.beta,
                            budget=s.max_new_tokens, is_correction=s.is_correction,
                            is_threshold=s.is_threshold, is_threshold_low=s.is_threshold_low,
                            temperature=s.temperature, draft_weight=s.draft_weight)


def run_grpo(ctx: common.Context, name: str, s: GRPOConfig):
  c = ctx.config
  cfg, params = ctx.models["policy"]
  pcfg = sampler.policy_config(cfg)  # what the sampler runs; the update scores with it too
  steps = common.stage_steps(ctx, s)
  G, N = s.group_size, s.max_new_tokens
  template = s.template or c.data.template
  tx, lr = train.make_optimizer(common.merged(c.optim, s.optim), steps * s.mu,
                                clip_apart_key="mtp" if s.draft_weight else "")
  loss = update_loss(pcfg, s)
  lora_cfg = common.lora_config(ctx)
  # the reference policy: with LoRA the frozen base itself, else the start params (or those of
  # the ref_from stage)
  step_fn = train.make_step(loss, tx, lr, accum_steps=int(c.train.accum_steps),
                            bias_gamma=float(c.train.bias_gamma) if cfg.is_moe else 0.0,
                            nonfinite=c.train.nonfinite,
                            reference_is_base=lora_cfg is not None and s.beta > 0)
  old_logprobs = (grpo_lib.old_logprobs_fn(pcfg, s.temperature) if s.is_correction != "none"
                  else None)
  state = {"train": common.new_state(ctx, params, tx, name, cfg, lora_cfg),
           "ref": (None if s.beta == 0 or lora_cfg is not None else
                   ctx.outputs[s.ref_from][1] if s.ref_from else params)}
  for j in range(s.staleness):  # the weights the pending rollouts sample from (checkpointed)
    state[_behind(j)] = _snapshot(state["train"])
  seed = ctx.seed(name)
  min_groups = _min_update_groups(ctx, s)
  it = _LaggedIterator(pipeline.prompt_batches(ctx.splits["rl"], batch_size=s.prompts_per_step,
                                               seed=seed))
  sampling = engine.Sampling(max_new_tokens=N, temperature=s.temperature, top_p=s.top_p,
                             record_routing=s.routing_replay, draft=s.draft)
  samples = common.SampleLog(ctx, name)
  buffer = partial.PartialRollouts(G, s.partial_tokens, N) if s.partial_tokens else None
  rollout_mesh = ctx.rollout_mesh if s.rollout_devices else ctx.mesh
  rollout_kw = dict(tokenizer=ctx.tokenizer, template=template, sampling=sampling, repeats=G,
                    reward_weights=s.reward_weights)
  scorer = _reward_model(ctx, name, s)  # the `reward_model` reward's model, or None

  def sample(st, records, key):
    return engine.rollout(train.full_params(st["train"]), pcfg, records, mesh=ctx.mesh,
                          rng=key, **rollout_kw)

  def batch_key(step):
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)

  pending = {}  # asynchronous GRPO: step -> its dispatched rollout
  carry = {}  # what next_batch hands to update: the weights of the rollout it dispatched

  on_rollout_mesh = {}  # LoRA with rollout_devices: the frozen base, sent there once

  def sampler_weights(train_state, behind):
    """The model the rollout samples with: the trained weights `behind` over the state's base.
    On devices of its own, LoRA sends only the adapters and biases there before each rollout
    (the base once); full fine-tuning sends the whole model."""
    weights = train_state.replace(params=behind["params"], router_bias=behind["router_bias"])
    if not s.rollout_devices:
      return train.full_params(weights)
    if train_state.base is None:
      return _to_mesh(train.full_params(weights), rollout_mesh)
    if "base" not in on_rollout_mesh:
      on_rollout_mesh["base"] = _to_mesh(train_state.base, rollout_mesh)
    sent = _to_mesh(behind, rollout_mesh)
    with jax.set_mesh(rollout_mesh):  # the merge runs on the sampling devices
      return train.full_params(weights.replace(base=on_rollout_mesh["base"], **sent))

  def start(step, train_state, behind):
    weights, key = sampler_weights(train_state, behind), batch_key(step)
    if s.rollout_devices:
      key = _to_mesh(key, rollout_mesh)
    return engine.start_rollout(weights, pcfg, it.draw(step, 1 + s.oversample),
                                mesh=rollout_mesh, rng=key, **rollout_kw)

  def collect(st, step):
    """Asynchronous GRPO: start the rollout of step + k from the current weights, then wait for
    the one of `step` (started k steps earlier, from the weights before update step - k).
    st[_behind(j)] holds the weights of the rollout of step + k - 1 - j."""
    k = s.staleness
    for j in reversed(range(k)):  # the stage's first step, or a resumed run's: oldest first
      if step + k - 1 - j not in pending and step + k - 1 - j < steps:
        pending[step + k - 1 - j] = start(step + k - 1 - j, st["train"], st[_behind(j)])
    it.mark(step + 1)  # a checkpoint after this step draws step + 1's prompts again on resume
    carry["behind"] = st[_behind(0)]
    if step + k < steps:
      carry["behind"] = _snapshot(st["train"])  # the update donates the state's buffers
      pending[step + k] = start(step + k, st["train"], carry["behind"])
    return pending.pop(step).result()

  def next_batch(st):
    t0 = time.time()
    scorer_flops = scorer.flops if scorer is not None else 0.0
    step = int(st["train"].step) // s.mu
    key = batch_key(step)
    partial_stats = {}
    pool = []  # refill candidates sampled beside the batch (asynchronous dynamic sampling)
    if s.staleness:
      scored, *pool = engine.split_batches(collect(st, step), 1 + s.oversample)
    elif buffer is not None:  # partial rollouts: segments until enough groups are complete
      scored, partial_stats = buffer.next_batch(
          train.full_params(st["train"]), pcfg, draw=lambda: next(it), groups=s.prompts_per_step,
          rows=s.rows, rng=key, tokenizer=ctx.tokenizer, mesh=ctx.mesh, template=template,
          sampling=sampling, reward_weights=s.reward_weights)
    else:
      scored = sample(st, next(it), key)
    fresh = scored  # on-policy rewards, before dynamic sampling swaps groups in
    adv, zero_var = grpo_lib.group_advantages(scored.rewards, G, s.advantage_scale)
    refills = refilled = 0
    while s.dynamic_sampling and zero_var.any() and refills < s.max_refills:
      # DAPO dynamic sampling: groups with equal rewards carry no signal; swap in fresh ones
      refills += 1
      candidates = (pool[refills - 1] if s.staleness else
                    sample(st, next(it), jax.random.fold_in(key, 1000 + refills)))
      if candidates.rollout.tokens.shape != scored.rollout.tokens.shape:
        scored.flops += candidates.flops
        continue  # a different prompt bucket: rows cannot be swapped in
      _, candidate_zero_var = grpo_lib.group_advantages(candidates.rewards, G)
      pairs = engine.refill_pairs(zero_var, candidate_zero_var)
      scored = engine.swap_groups(scored, candidates, pairs, G)
      refilled += len(pairs)
      adv, zero_var = grpo_lib.group_advantages(scored.rewards, G, s.advantage_scale)
    rollout, update_adv = scored.rollout, adv
    if s.drop_zero_var:
      groups = update_groups(zero_var, min_groups)
      rollout = take_groups(rollout, groups, G)
      update_adv = np.asarray(adv).reshape(-1, G)[groups].reshape(-1)
    batch = grpo_batch(rollout, update_adv, mask_truncated=s.mask_truncated,
                       routing=s.routing_replay, length_bucket=s.length_bucket,
                       share_prompt=G if s.share_prompt else 0)
    batch = pad_columns(batch, parallel.position_multiple(ctx.mesh, pcfg.context_order))
    samples.add(step, {"question": scored.records[0]["question"],
                       "completion": scored.completions[0], "reward": float(scored.rewards[0])})
    lengths = np.asarray(scored.rollout.lengths)
    host = dict(reward=float(fresh.rewards.mean()), reward_trained=float(scored.rewards.mean()),
                reward_std=float(scored.rewards.std()),
                completion_len=float(lengths.mean()), completion_len_max=float(lengths.max()),
                truncated_frac=float(np.mean(scored.rollout.truncated)),
                zero_var_groups=float(zero_var.mean()), refills=float(refills),
                refilled_groups=float(refilled),
                rollout_seconds=time.time() - t0,
                rollout_tokens_per_sec=float(lengths.sum()) / max(time.time() - t0, 1e-9))
    host["update_rows"] = float(rollout.tokens.shape[0])
    if scored.draft_accept_rate is not None:  # speculative rollouts: the drafts accepted
      host["draft_accept_rate"] = scored.draft_accept_rate
      if scored.rollout.decode_steps is not None:  # one call (partial rollouts make several)
        host["decode_steps"] = float(scored.rollout.decode_steps)
    host.update(fresh.reward_means())
    host.update(partial_stats)
    forward = _forward_flops(pcfg, batch)
    update_flops = s.mu * forward * flops.train_factor(frozen_weights=lora_cfg is not None)
    if s.beta > 0:
      update_flops += s.mu * forward
    if s.draft_weight:  # the MTP modules' forward and backward (none into the trunk)
      update_flops += s.mu * _draft_flops(pcfg, batch) * flops.train_factor()
    batch = common.shard(ctx, batch)
    if old_logprobs is not None:  # pi_old = the trainer at the sampler's parameters
      batch = batch.replace(old_logprobs=old_logprobs(train.full_params(st["train"]), batch))
      update_flops += forward
    host["flops"] = scored.flops + update_flops
    if scorer is not None:  # the reward model's forwards over this step's rollouts
      host["flops"] += scorer.flops - scorer_flops
    return batch, host

  def update(st, batch):
    train_state, first, metrics = st["train"], None, None
    for _ in range(s.mu):
      train_state, metrics = step_fn(train_state, batch, st["ref"])
      first = first or metrics
    # mismatch metrics belong to the first update: the sampler's parameters
    metrics = dict(metrics, **{k: v for k, v in first.items() if "mismatch" in k})
    ref = st["ref"]
    if ref is not None and s.ref_refresh_every and \
        (int(train_state.step) // s.mu) % s.ref_refresh_every == 0:
      # a copy: the next step donates the state's buffers, and the reference is passed beside
      # it (sharing them failed with "a buffer that was previously donated"). A LoRA
      # reference is the base: never refreshed
      ref = jax.tree.map(jnp.copy, train.full_params(train_state))
    out = {"train": train_state, "ref": ref}
    if s.staleness:  # the rollouts in flight: the one just dispatched, then the older ones
      out[_behind(0)] = carry["behind"]
      out.update({_behind(j): st[_behind(j - 1)] for j in range(1, s.staleness)})
    return out, metrics

  with jax.set_mesh(ctx.mesh), (rewards.bind("reward_model", scorer) if scorer is not None
                                else contextlib.nullcontext()):
    state, metrics = common.train_loop(ctx, name, state, steps=steps, next_batch=next_batch,
                                       data_iter=_WithPartial(it, buffer) if buffer else it,
                                       update=update, log_keys=("reward", "loss"),
                                       overlap=False)
  common.record_lora_output(ctx, name, state["train"])
  ctx.models["policy"] = (cfg, train.full_params(state["train"]))
  return metrics


def _reward_model(ctx: common.Context, name: str, s: GRPOConfig):
  """The scorer of the `reward_model` reward (`rollout.reward_model`), or None without one."""
  if not s.reward_model:
    return None
  from r1jax.rollout.reward_model import Ensemble, ModelReward
  from r1jax.stages.reward_model import load_reward_model
  scorers = []
  for ref in s.reward_models:
    cfg, params = load_reward_model(ctx, ref, f"stages.{name}.reward_model")
    scorers.append(ModelReward(cfg, params, ctx.tokenizer, ctx.mesh,
                               max_len=cfg.max_position_embeddings))
  return scorers[0] if len(scorers) == 1 else Ensemble(scorers, s.reward_model_aggregate)


def _behind(j: int) -> str:
  """The state key of the weights of the j-th newest rollout in flight (asynchronous GRPO)."""
  return "behind" if j == 0 else f"behind_{j}"


def _snapshot(train_state) -> dict:
  """A copy of the trained weights (the model or LoRA adapters, and the correction biases): what
  asynchronous GRPO samples the next batch from while the update changes the state."""
  return {"params": jax.tree.map(jnp.copy, train_state.params),
          "router_bias": jax.tree.map(jnp.copy, train_state.router_bias)}


def _to_mesh(params, mesh):
  """The weights (any arrays) replicated on the sampler's own devices (`rollout_devices`). One process copies
  device to device; several go through host memory (every process holds the whole model)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(params, replicated)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      x.shape, replicated, lambda idx, x=x: x[idx]), parallel.to_host(params))


class _LaggedIterator:
  """The prompt iterator as a checkpoint sees it. Asynchronous GRPO draws step t+k's prompts at
  step t (`draw(t + k)`, which records the state before the draw); after `mark(t + 1)` the saved
  state is the one before step t+1's draw, so a run resumed after step t draws the prompts of
  the rollouts in flight again and samples the same batches."""

  def __init__(self, it):
    self.it, self.saved, self.before = it, None, {}

  def __next__(self):
    return next(self.it)

  def draw(self, step: int, batches: int = 1):
    """Step `step`'s prompts: `batches` batches of the stream, as one list."""
    self.before[step] = self.it.get_state()
    return [r for _ in range(batches) for r in next(self.it)]

  def mark(self, step: int):
    """The saved state: the one before step `step`'s draw (or now, if it has not drawn)."""
    self.saved = self.before.get(step, self.it.get_state())
    self.before = {t: v for t, v in self.before.items() if t >= step}

  def get_state(self):
    return self.it.get_state() if self.saved is None else self.saved

  def set_state(self, state):
    self.it.set_state(state)
    self.saved, self.before = None, {}


class _WithPartial:
  """The prompt iterator and the partial-rollout buffer as one checkpointed data state: a
  resumed run continues the rows in flight and the records drawn but not started."""

  def __init__(self, it, buffer: partial.PartialRollouts):
    self.it, self.buffer = it, buffer

  def get_state(self):
    return {"prompts": self.it.get_state(), "partial": self.buffer.state()}

  def set_state(self, state):
    self.it.set_state(state["prompts"])
    self.buffer.set_state(state["partial"])


def _forward_flops(cfg, batch: grpo_lib.GRPOBatch) -> float:
  """Model FLOPs of one forward over an update batch: its rows, and each shared prompt once."""
  B, T = batch.tokens.shape
  if batch.prefix_tokens is None:
    return flops.forward_flops(cfg, B * T, T)
  Bp, Tp = batch.prefix_tokens.shape
  return flops.forward_flops(cfg, Bp * Tp, Tp) + flops.forward_flops(cfg, B * T, Tp + T)


def _draft_flops(cfg, batch: grpo_lib.GRPOBatch) -> float:
  """Model FLOPs of the MTP modules' forward over an update batch (whole rows: no shared
  prompt)."""
  B, T = batch.tokens.shape
  return (flops.forward_flops(cfg, B * T, T, mtp=True) - flops.forward_flops(cfg, B * T, T))


def _min_update_groups(ctx: common.Context, s: GRPOConfig) -> int:
  """The fewest groups a `drop_zero_var` update runs on: a power of two >= 2 whose rows split
  evenly into the gradient-accumulation micro-batches and over the batch's devices (else the
  batch would be replicated), at most every group."""
  devices = parallel.batch_devices(ctx.mesh)
  accum = int(ctx.config.train.accum_steps)
  m = 2
  while m < s.prompts_per_step and (m * s.group_size) % int(np.lcm(devices, accum)):
    m *= 2
  return min(m, s.prompts_per_step)

