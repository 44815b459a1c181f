"""The `reward_model` stage: train a reward model on preference pairs (Bradley-Terry), and load
one for a GRPO stage's `reward_model` reward. Fields and defaults:
`r1jax.stages.configs.RewardModelConfig`.

DeepSeek-R1's last RL stage scores reasoning prompts with rules and general ones with reward
models. Here a reward model is the policy's own architecture with a one-label `score` head in
place of the LM head (HF's `*ForSequenceClassification`; `ModelConfig.num_labels`): its trunk
starts from the policy (or the `start_from` stage's output), its head from zero-mean noise. The
policy does not change. A finished stage's model is saved under outputs/<stage>/ like every
training stage's, and a GRPO stage names it in `reward_model` (or names a HF classifier
checkpoint directory instead).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from r1jax import fileio, flops, hf, parallel, train
from r1jax.checkpoint import sources
from r1jax.data import pipeline
from r1jax.errors import ConfigError, DataError
from r1jax.model.config import ModelConfig
from r1jax.stages import common
from r1jax.stages.configs import RewardModelConfig


def reward_model_config(base: ModelConfig) -> ModelConfig:
  """The reward model of a policy architecture: one label, no MTP module (it needs the LM
  head)."""
  return base.replace(num_labels=1, num_nextn_predict_layers=0)


def base_model(ctx: common.Context, s: RewardModelConfig):
  """(config, params) the reward model's trunk starts from."""
  return ctx.outputs[s.start_from] if s.start_from else ctx.models["policy"]


def initial_params(ctx: common.Context, name: str, s: RewardModelConfig):
  """(reward-model config, params): the base model's trunk and a fresh `score` head, or, when
  the base is an earlier reward model, that model whole (this stage continues it)."""
  base_cfg, base = base_model(ctx, s)
  if base_cfg.num_labels:
    return base_cfg, base  # new_state trains a copy
  cfg = reward_model_config(base_cfg)
  fresh = parallel.init_sharded(cfg, ctx.mesh, jax.random.PRNGKey(ctx.seed(name + "/init")))
  return cfg, {k: fresh[k] if k == "score" else base[k] for k in fresh}


def read_pairs(ctx: common.Context, name: str, s: RewardModelConfig) -> list[dict]:
  """The pairs of the stage's data file(s), pooled in the order the files are named. One of
  several may be empty (a sampling round without a prompt that got both a passing and a failing
  answer); a missing file, or no pair at all, is an error."""
  pairs, paths = [], [fileio.under(ctx.workdir, f.strip()) for f in s.data_file.split(",")]
  for path in paths:
    if not path.is_file() or (len(paths) == 1 and path.stat().length == 0):
      raise DataError(f"stages.{name}.data_file={s.data_file!r}: no preference pairs at {path} "
                      "(a rejection stage writes them with pairs=True when some prompt got both "
                      "a passing and a failing sample)")
    if path.stat().length:
      pairs += pipeline.read_pairs(os.fspath(path))
  if not pairs:
    raise DataError(f"stages.{name}.data_file={s.data_file!r}: its files hold no preference "
                    "pairs")
  return pairs


def held_out_questions(ctx: common.Context, name: str, s: RewardModelConfig,
                       questions: list[str]) -> set[str]:
  """The held-out questions among `questions`: a seeded choice of round(heldout_frac * n) of
  the n distinct ones. A stage that continues an earlier reward model keeps that model's split
  (its held-out questions stay held out, its training questions stay in training) and splits
  only the questions new to it, so no held-out question was ever trained on."""
  new = sorted(set(questions))
  held_out = set()
  prev = ctx.config.stages.get(s.start_from) if s.start_from else None
  if prev is not None and prev.kind == "reward_model":
    from r1jax.run_config import stage_configs
    prev_s = stage_configs(ctx.config)[s.start_from]
    seen = sorted({p["question"] for p in read_pairs(ctx, s.start_from, prev_s)})
    held_out = held_out_questions(ctx, s.start_from, prev_s, seen) & set(new)
    new = sorted(set(new) - set(seen))
  order = np.random.default_rng(ctx.seed(name + "/heldout")).permutation(len(new))
  return held_out | {new[i] for i in order[:int(round(s.heldout_frac * len(new)))]}


def split_pairs(ctx: common.Context, name: str, s: RewardModelConfig):
  """(training pairs, held-out pairs): every pair of a held-out question
  (`held_out_questions`) is held out, so no held-out question is trained on."""
  pairs = read_pairs(ctx, name, s)
  held_out = held_out_questions(ctx, name, s, [p["question"] for p in pairs])
  held = [p for p in pairs if p["question"] in held_out]
  training = [p for p in pairs if p["question"] not in held_out]
  if len(training) < s.pairs_per_step:
    raise DataError(f"stages.{name}: {len(training)} training pairs ({len(pairs)} in "
                    f"{s.data_file}, {len(held)} held out) are fewer than pairs_per_step="
                    f"{s.pairs_per_step}")
  return training, held


def pair_accuracy(ctx: common.Context, cfg: ModelConfig, params, pairs, *, template: str,
                  pairs_per_batch: int) -> dict:
  """The share of `pairs` the model scores the right way round, and the mean margin (every
  pair once, in batches of pairs_per_batch; the last padded with repeats and the padding
  dropped)."""
  from r1jax.train.losses.reward import pair_scores
  seq_len = int(ctx.config.data.seq_len)
  it = pipeline.pair_batches(pairs + pairs[:(-len(pairs)) % pairs_per_batch], ctx.tokenizer,
                             seq_len=seq_len, pairs=pairs_per_batch, seed=0,
                             template=template, shuffle=False, num_epochs=1)
  score = jax.jit(lambda p, b: pair_scores(p, b, cfg)[0],
                  out_shardings=jax.sharding.NamedSharding(ctx.mesh,
                                                           jax.sharding.PartitionSpec()))
  margins = []
  with jax.set_mesh(ctx.mesh):
    for batch in it:
      r = np.asarray(score(params, common.shard(ctx, batch)))
      margins.append(r[:, 0] - r[:, 1])
  margin = np.concatenate(margins)[:len(pairs)]
  return {"accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin)),
          "num_pairs": len(pairs)}


def run_reward_model(ctx: common.Context, name: str, s: RewardModelConfig):
  c = ctx.config
  template = s.template or c.data.template
  training, held = split_pairs(ctx, name, s)
  cfg, params = initial_params(ctx, name, s)
  steps = common.stage_steps(ctx, s)
  tx, lr = train.make_optimizer(common.merged(c.optim, s.optim), steps)
  loss = train.reward_loss(cfg, center_coef=s.center_coef,
                           balance_alpha=float(c.train.balance_alpha))
  step_fn = train.make_step(loss, tx, lr, accum_steps=int(c.train.accum_steps),
                            bias_gamma=float(c.train.bias_gamma) if cfg.is_moe else 0.0,
                            nonfinite=c.train.nonfinite)
  state = common.new_state(ctx, params, tx, name, cfg)
  T = int(c.data.seq_len)
  it = pipeline.pair_batches(training, ctx.tokenizer, seq_len=T, pairs=s.pairs_per_step,
                             seed=ctx.seed(name), template=template)
  step_flops = flops.train_flops(cfg, 2 * s.pairs_per_step * T, T)

  def next_batch(state):
    del state
    return common.shard(ctx, next(it)), {"flops": step_flops}

  with jax.set_mesh(ctx.mesh):
    state, metrics = common.train_loop(ctx, name, state, steps=steps, next_batch=next_batch,
                                       data_iter=it, update=step_fn,
                                       log_keys=("loss", "accuracy"))
  params = train.full_params(state)
  ctx.models["reward"] = (cfg, params)
  metrics = dict(metrics, num_training_pairs=float(len(training)))
  eval_out = None
  if s.eval and held:
    eval_out = pair_accuracy(ctx, cfg, params, held, template=template,
                             pairs_per_batch=s.pairs_per_step)
  return metrics, eval_out


def load_reward_model(ctx: common.Context, ref: str, where: str):
  """(config, params) of the reward model a GRPO stage names: an earlier reward_model stage's
  output, or a HF `*ForSequenceClassification` checkpoint directory."""
  if ref in ctx.outputs:
    return ctx.outputs[ref]
  path = sources.resolve(ref)
  if not os.path.isdir(path):
    raise ConfigError(f"{where}={ref!r} is neither an earlier reward_model stage nor a "
                      "checkpoint directory")
  run = ctx.model_cfg  # how to run it: the policy's dtype and MoE path
  cfg, params = hf.load(path, dtype=run.jnp_param_dtype, moe_impl=run.moe_impl,
                        capacity_factor=run.capacity_factor)
  if cfg.num_labels != 1:
    raise ConfigError(f"{where}={ref!r}: the checkpoint is not a one-label sequence classifier "
                      f"(num_labels={cfg.num_labels})")
  return cfg, parallel.shard_params(params, cfg, ctx.mesh)
