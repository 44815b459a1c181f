"""AdamW with warmup + cosine/constant schedule, global-norm clipping, no decay on vectors."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from r1jax.errors import ConfigError


class ScheduleState(NamedTuple):
  """The learning-rate schedule as optimizer state: the step count and the schedule's numbers
  (`schedule_values`). Jitted steps see them as inputs, not constants, so SFT stages that differ
  only in their schedule (a cold start and its compute-matched control, say) lower to the same
  program and share one compilation (jax's persistent cache; ~25 s per stage at r1_tiny size)."""
  count: jax.Array
  values: jax.Array  # float32 [peak lr, warmup steps, decay steps, min lr ratio, cosine (0/1)]


def schedule_values(optim_cfg, total_steps: int) -> tuple[float, ...]:
  lr = float(optim_cfg.lr)
  warmup = max(int(optim_cfg.get("warmup_steps", 0)), 0)
  kind = optim_cfg.get("schedule", "cosine")
  if kind not in ("cosine", "constant"):
    raise ConfigError(f"optim.schedule={kind!r} must be 'cosine' or 'constant'")
  return (lr, float(warmup), float(max(total_steps - warmup, 1)),
          float(optim_cfg.get("min_lr_ratio", 0.1)), float(kind == "cosine"))


def lr_at(count, values):
  """Linear warmup from 0 to the peak over `warmup` steps, then constant or cosine decay to
  peak x min_lr_ratio over the remaining steps (optax's linear, constant and cosine_decay
  schedules joined at the warmup's end)."""
  peak, warmup, decay_steps, alpha, cosine = (values[i] for i in range(5))
  count = jnp.asarray(count, jnp.float32)
  warm = peak * count / jnp.maximum(warmup, 1.0)
  t = jnp.clip(count - warmup, 0.0, decay_steps) / decay_steps
  decayed = peak * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * t)) + alpha)
  after = jnp.where(cosine > 0, decayed, peak)
  return jnp.where(count < warmup, warm, after)


def scale_by_schedule_state(values) -> optax.GradientTransformation:
  """updates x -lr(count), with the schedule carried in the state (`ScheduleState`)."""
  def init(params):
    del params
    return ScheduleState(count=jnp.zeros((), jnp.int32),
                         values=jnp.asarray(values, jnp.float32))

  def update(updates, state, params=None):
    del params
    step = -lr_at(state.count, state.values)
    updates = jax.tree.map(lambda u: (step * u).astype(u.dtype), updates)
    return updates, ScheduleState(count=optax.safe_int32_increment(state.count),
                                  values=state.values)

  return optax.GradientTransformation(init, update)


def current_lr(opt_state):
  """The learning rate the next update applies, from the `ScheduleState` in `opt_state`."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))
           if isinstance(s, ScheduleState)]
  return lr_at(found[0].count, found[0].values)


def clip_apart(max_norm: float, key: str) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm`, with the leaves under a dict key `key` (at any depth) clipped
  by their own global norm and the rest by theirs: a module trained beside the model (GRPO's
  MTP draft) then never scales the model's update."""
  def inside(path) -> bool:
    return any(getattr(k, "key", None) == key for k in path)

  def clip(leaves):
    norm = optax.tree.norm(leaves)
    return [jnp.where(norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm) for t in leaves]

  def update(updates, state, params=None):
    del params
    paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
    flags = [inside(p) for p, _ in paths]
    leaves = [x for _, x in paths]
    parts = {f: clip([x for x, g in zip(leaves, flags) if g == f]) for f in (False, True)}
    its = {f: iter(v) for f, v in parts.items()}
    return jax.tree_util.tree_unflatten(treedef, [next(its[f]) for f in flags]), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, total_steps: int, clip_apart_key: str = ""):
  """(optax transformation, lr of an opt_state). AdamW; moments in `optim.mu_dtype` (bf16 per
  the V3 recipe when set), master weights in the params' own dtype; the schedule in the state.
  clip_apart_key: the gradient of the leaves under this key is clipped by its own norm
  (`clip_apart`), the rest by theirs; "" clips all by one global norm."""
  mu_dtype = optim_cfg.get("mu_dtype", None)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  clip_norm = float(optim_cfg.get("clip_norm", 1.0))
  tx = optax.chain(
      clip_apart(clip_norm, clip_apart_key) if clip_apart_key
      else optax.clip_by_global_norm(clip_norm),
      optax.scale_by_adam(b1=float(optim_cfg.get("b1", 0.9)), b2=float(optim_cfg.get("b2", 0.95)),
                          eps=float(optim_cfg.get("eps", 1e-8)),
                          mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None),
      optax.add_decayed_weights(float(optim_cfg.get("weight_decay", 0.0)), decay_mask),
      scale_by_schedule_state(schedule_values(optim_cfg, total_steps)))
  return tx, current_lr
