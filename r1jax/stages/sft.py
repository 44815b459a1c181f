"""Supervised stages: `sft` (cold start, or SFT on rejection-sampled data), `pretrain` (plain
next-token loss on problems and answers, no reasoning: the base model of the R1-Zero path), and
`distill` (a dense student learns from the policy: on sampled traces and/or teacher logits)."""

from __future__ import annotations

import os

import jax
import numpy as np

from r1jax import fileio, flops, parallel, train
from r1jax.model.config import ModelConfig
from r1jax.data import pipeline
from r1jax.errors import DataError
from r1jax.stages import common
from r1jax.stages.configs import DistillConfig, SFTConfig


def stage_records(ctx: common.Context, stage_cfg: SFTConfig) -> list[dict]:
  """The stage's training records: `stage.data_file` (relative paths are under the workdir,
  e.g. the samples/<stage>.jsonl a rejection-sampling stage wrote), plus the built-in task's SFT
  split when `stage.with_sft_split`; data.train_file when data.task == "file"; or the built-in
  task's SFT split."""
  c = ctx.config
  path = stage_cfg.data_file
  if path:
    path = fileio.under(ctx.workdir, path)
    records = []
    if not (path.is_file() and path.stat().length == 0):  # empty: a stage that kept nothing
      records = pipeline.read_records(os.fspath(path), prompt_field="question",
                                      completion_field="completion", answer_field="answer")
    if stage_cfg.with_sft_split:
      if not (ctx.splits and ctx.splits.get("sft")):
        raise DataError("with_sft_split needs the built-in task's SFT split (data.task is "
                        f"{c.data.task!r})")
      records = records + list(ctx.splits["sft"])
    return records
  if c.data.task == "file":
    return pipeline.read_records(c.data.train_file, prompt_field=c.data.prompt_field,
                                 completion_field=c.data.completion_field,
                                 answer_field=c.data.answer_field)
  records = ctx.splits["sft"]
  if stage_cfg.kind == "pretrain":
    return pretrain_records(records, stage_cfg.tagged_frac, c.seed)
  return records


def pretrain_records(records, tagged_frac: float, seed: int) -> list[dict]:
  """R1-Zero's base-model corpus: each problem followed by its answer, with no reasoning.

  Most documents give the bare answer. A `tagged_frac` share (a seeded choice) writes the same
  answer in the think/answer markup, `{question}\\n</think>\\n<answer>{answer}</answer>`: the think
  block only restates the question, so no worked step is shown. A real base model has met such
  markup in its web data, which is why it follows the R1-Zero template some of the time; a
  char-level base trained on bare answers never emits a tag, leaving GRPO's format reward
  nothing to reinforce."""
  tagged = np.random.default_rng(seed).random(len(records)) < tagged_frac
  # eos is appended when the SFT example is built (template.completion_text)
  return [dict(r, completion=(f"{r['question']}\n</think>\n<answer>{r['answer']}</answer>"
                              if t else str(r["answer"])))
          for r, t in zip(records, tagged)]


def sft_iterator(ctx: common.Context, records, stage_cfg, name: str):
  """The stage's global batches. Every process builds the same global batch and places its own
  rows (`common.shard`): the data and its order do not depend on the number of processes."""
  c = ctx.config
  template = stage_cfg.template or c.data.template
  return pipeline.sft_batches(records, ctx.tokenizer, seq_len=int(c.data.seq_len),
                              batch_size=int(c.data.batch_size), seed=ctx.seed(name),
                              template=template, pack=bool(c.data.pack))


def _run(ctx: common.Context, name: str, stage_cfg, cfg: ModelConfig, params, loss_fn,
         frozen=None, *, step_flops: float, lora_cfg=None):
  c = ctx.config
  steps = common.stage_steps(ctx, stage_cfg)
  optim_cfg = common.merged(c.optim, stage_cfg.optim)
  tx, lr = train.make_optimizer(optim_cfg, steps)
  records = stage_records(ctx, stage_cfg)
  if not records:
    ctx.log.info(f"[{name}] WARNING: no training records (the data file is empty); the stage "
                 "leaves the model unchanged")
    return params, {"skipped_no_data": 1.0}
  state = common.new_state(ctx, params, tx, name, cfg, lora_cfg)
  it = sft_iterator(ctx, records, stage_cfg, name)
  step_fn = train.make_step(loss_fn, tx, lr, accum_steps=int(c.train.accum_steps),
                            bias_gamma=float(c.train.bias_gamma) if cfg.is_moe else 0.0,
                            nonfinite=c.train.nonfinite)

  def next_batch(state):
    del state
    return common.shard(ctx, next(it)), {"flops": step_flops}

  with jax.set_mesh(ctx.mesh):
    try:
      state, metrics = common.train_loop(ctx, name, state, steps=steps, next_batch=next_batch,
                                         data_iter=it, update=lambda s, b: step_fn(s, b, frozen))
    finally:
      it.close()  # stops its prefetch thread
  common.record_lora_output(ctx, name, state)
  return train.full_params(state), metrics


def run_sft(ctx: common.Context, name: str, stage_cfg):
  cfg, params = ctx.models["policy"]
  t = ctx.config.train
  mtp_weight = float(t.mtp_weight if stage_cfg.mtp_weight is None else stage_cfg.mtp_weight)
  loss = train.sft_loss(cfg, mtp_weight=mtp_weight, balance_alpha=float(t.balance_alpha))
  use_mtp = mtp_weight > 0 and cfg.is_moe and cfg.num_nextn_predict_layers > 0
  lora_cfg = common.lora_config(ctx)
  params, metrics = _run(ctx, name, stage_cfg, cfg, params, loss,
                         step_flops=sft_step_flops(ctx, cfg, use_mtp=use_mtp,
                                                   lora=lora_cfg is not None),
                         lora_cfg=lora_cfg)
  ctx.models["policy"] = (cfg, params)
  return metrics


def sft_step_flops(ctx: common.Context, cfg: ModelConfig, *, use_mtp: bool = False,
                   lora: bool = False) -> float:
  """Model FLOPs of one SFT step: every position of the [batch, seq_len] batch (packed rows are
  nearly full; padding costs what a token costs)."""
  c = ctx.config
  T = int(c.data.seq_len)
  return flops.train_flops(cfg, int(c.data.batch_size) * T, T, mtp=use_mtp, frozen_weights=lora)


def student_config(ctx: common.Context, stage_cfg: DistillConfig) -> ModelConfig:
  """The student's config: that of the stage's `start_from` stage (whose student it continues),
  else a fresh one from `student`."""
  if stage_cfg.start_from:
    return ctx.outputs[stage_cfg.start_from][0]
  fields = dict(stage_cfg.student)
  fields.setdefault("vocab_size", ctx.model_cfg.vocab_size)
  # the student's head runs as many positions at a time as the policy's (its losses then form
  # no [B, T, V] logits: `train.distill_loss`, `model.target_logprobs`)
  fields.setdefault("logits_chunk", ctx.model_cfg.logits_chunk)
  return ModelConfig.from_config(fields)


def teacher_model(ctx: common.Context, stage_cfg: DistillConfig):
  """(config, params) of the teacher: the output of the stage's `teacher` stage, else the
  current policy."""
  return ctx.outputs[stage_cfg.teacher] if stage_cfg.teacher else ctx.models["policy"]


def distill_step_flops(ctx: common.Context, stage_cfg: DistillConfig,
                       teacher_cfg: ModelConfig) -> float:
  """Model FLOPs of one sequence- or logit-mode distillation step: the student's SFT step, plus
  the teacher's forward over the batch in logit mode. (An on_policy step's depend on its
  samples: `r1jax.stages.onpolicy`.)"""
  step = sft_step_flops(ctx, student_config(ctx, stage_cfg))
  if stage_cfg.mode == "logit":
    T = int(ctx.config.data.seq_len)
    step += flops.forward_flops(teacher_cfg, int(ctx.config.data.batch_size) * T, T)
  return step


def run_distill(ctx: common.Context, name: str, stage_cfg):
  """Distil the policy into a dense student: `mode` "sequence" (SFT on the stage's data, e.g.
  the rejection-sampled traces, as R1 does), "logit" (divergence to the teacher's logits on
  the same data, optionally mixed with CE) or "on_policy" (`r1jax.stages.onpolicy`). The
  student is fresh, or with `start_from` the student of that earlier distill stage."""
  if stage_cfg.mode == "on_policy":
    from r1jax.stages import onpolicy  # pulls in the sampler and rewards
    return onpolicy.run_onpolicy_distill(ctx, name, stage_cfg)
  t_cfg, t_params = teacher_model(ctx, stage_cfg)
  s_cfg = student_config(ctx, stage_cfg)
  if stage_cfg.start_from:
    s_params = ctx.outputs[stage_cfg.start_from][1]
  else:  # created on the mesh: every process holds its shards of the same values
    s_params = parallel.init_sharded(s_cfg, ctx.mesh,
                                     jax.random.PRNGKey(ctx.seed(name + "/init")))
  if stage_cfg.mode == "sequence":
    loss, frozen = train.sft_loss(s_cfg), None
  else:
    loss = train.distill_loss(s_cfg, t_cfg, kind=stage_cfg.divergence,
                              temperature=stage_cfg.temperature, ce_weight=stage_cfg.ce_weight)
    frozen = t_params
  params, metrics = _run(ctx, name, stage_cfg, s_cfg, s_params, loss, frozen,
                         step_flops=distill_step_flops(ctx, stage_cfg, t_cfg))
  ctx.models["student"] = (s_cfg, params)
  return metrics
