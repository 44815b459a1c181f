"""On-policy distillation: a `distill` stage with `mode="on_policy"`.

Each step the student samples `group_size` completions for each of `prompts_per_step` prompts
of the RL split, and the loss is the divergence from the teacher (the current policy, or the
`teacher` stage's output) at every position the student visited, over the whole vocabulary:

    loss = mean over sampled completion tokens t of  D(q_student(. | x, y_<t), p_teacher(. | x, y_<t))

with D = reverse KL, KL(q || p), for `divergence="reverse_kl"`: GKD with only student samples
(Agarwal et al. 2024, lambda = 1), what is now called on-policy distillation. Gradients flow
through the student's distributions, not through the sampling (the samples are the batch, as
in GKD). The teacher's per-token distribution is dense supervision at the states the student
actually reaches, where sequence distillation only shows the teacher's own states.

The student continues an earlier distill stage (`start_from`), and the teacher scores with the
sampler's policy config (dropless MoE). Teacher and student share the tokenizer. The sampling
keys are fold_in(stage seed, step), so a resumed stage samples what an uninterrupted one would.
Each step logs the student's sample accuracy (`sample_accuracy`, the accuracy reward of its own
samples, where the records have answers), the divergence and the completion lengths; at log
steps the student's first sample goes to samples/<stage>.jsonl.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from r1jax import flops, parallel, train
from r1jax.data import pipeline
from r1jax.rollout import engine, sampler
from r1jax.stages import common, sft
from r1jax.stages.configs import DistillConfig
from r1jax.stages.grpo import grpo_batch, pad_columns

BATCH_FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def onpolicy_batch(rollout: sampler.Rollout, length_bucket: int = 0,
                   multiple: int = 1) -> dict:
  """Sampler output -> the distillation batch (host arrays): the rows as GRPO's update sees them
  (left-padded prompt + completion; `loss_mask` 1 where the target is a sampled completion
  token, the stop token included), with the columns cut after the longest completion rounded
  up to `length_bucket` and padded to a multiple of `multiple` (`grpo.pad_columns`)."""
  batch = grpo_batch(rollout, np.zeros(rollout.tokens.shape[0], np.float32),
                     mask_truncated=False, length_bucket=length_bucket)
  batch = pad_columns(batch, multiple)
  return {f: np.asarray(getattr(batch, f)) for f in BATCH_FIELDS}


def run_onpolicy_distill(ctx: common.Context, name: str, s: DistillConfig):
  c = ctx.config
  t_cfg, t_params = sft.teacher_model(ctx, s)
  t_cfg = sampler.policy_config(t_cfg)  # the teacher scores dropless, as the sampler runs
  s_cfg, s_params = ctx.outputs[s.start_from]
  scfg = sampler.policy_config(s_cfg)  # what the student samples with, and trains
  steps = common.stage_steps(ctx, s)
  tx, lr = train.make_optimizer(common.merged(c.optim, s.optim), steps)
  loss = train.distill_loss(scfg, t_cfg, kind=s.divergence, temperature=s.temperature)
  step_fn = train.make_step(loss, tx, lr, accum_steps=int(c.train.accum_steps),
                            bias_gamma=float(c.train.bias_gamma) if scfg.is_moe else 0.0,
                            nonfinite=c.train.nonfinite)
  state = common.new_state(ctx, s_params, tx, name, scfg)
  seed = ctx.seed(name)
  records = ctx.splits["rl"]
  it = pipeline.prompt_batches(records, batch_size=s.prompts_per_step, seed=seed)
  sampling = engine.Sampling(max_new_tokens=s.max_new_tokens, temperature=s.sample_temperature)
  # the student's own accuracy, where the problems have answers (logged, not trained on)
  rewards = ({"accuracy": 1.0} if records and all(r.get("answer") not in (None, "")
                                                  for r in records) else None)
  template = s.template or c.data.template
  multiple = parallel.position_multiple(ctx.mesh, scfg.context_order)
  samples = common.SampleLog(ctx, name)

  def next_batch(state):
    t0 = time.time()
    step = int(state.step)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    scored = engine.rollout(train.full_params(state), scfg, next(it), tokenizer=ctx.tokenizer,
                            mesh=ctx.mesh, template=template, sampling=sampling, rng=key,
                            repeats=s.group_size, reward_weights=rewards)
    batch = onpolicy_batch(scored.rollout, s.length_bucket, multiple)
    B, T = batch["tokens"].shape
    lengths = np.asarray(scored.rollout.lengths)
    host = dict(completion_len=float(lengths.mean()), completion_len_max=float(lengths.max()),
                truncated_frac=float(np.mean(scored.rollout.truncated)),
                rollout_seconds=time.time() - t0,
                # sampling, the student's training step, the teacher's forward
                flops=scored.flops + flops.train_flops(scfg, B * T, T)
                + flops.forward_flops(t_cfg, B * T, T))
    if scored.rewards is not None:
      host["sample_accuracy"] = float(np.mean(scored.rewards))
    # the student's first sample of the step, as GRPO logs its own
    samples.add(step, {"question": scored.records[0]["question"],
                       "completion": scored.completions[0]}
                | ({} if scored.rewards is None else {"reward": float(scored.rewards[0])}))
    return common.shard(ctx, batch), host

  with jax.set_mesh(ctx.mesh):
    state, metrics = common.train_loop(
        ctx, name, state, steps=steps, next_batch=next_batch, data_iter=it,
        update=lambda st, b: step_fn(st, b, t_params),
        log_keys=("divergence", "sample_accuracy"), overlap=False)
  ctx.models["student"] = (s_cfg, train.full_params(state))
  return metrics
