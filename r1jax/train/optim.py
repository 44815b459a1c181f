"""AdamW with warmup + cosine/constant schedule, global-norm clipping, no decay on vectors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from r1jax.errors import ConfigError


def schedule(optim_cfg, total_steps: int):
  lr = float(optim_cfg.lr)
  warmup = int(optim_cfg.get("warmup_steps", 0))
  kind = optim_cfg.get("schedule", "cosine")
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                        alpha=float(optim_cfg.get("min_lr_ratio", 0.1)))
  else:
    raise ConfigError(f"optim.schedule={kind!r} must be 'cosine' or 'constant'")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim_cfg, total_steps: int):
  """(optax transformation, lr schedule). Moments in `optim.mu_dtype` (bf16 per the V3 recipe
  when set), master weights in the params' own dtype."""
  lr = schedule(optim_cfg, total_steps)
  mu_dtype = optim_cfg.get("mu_dtype", None)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.get("clip_norm", 1.0))),
      optax.adamw(lr, b1=float(optim_cfg.get("b1", 0.9)), b2=float(optim_cfg.get("b2", 0.95)),
                  eps=float(optim_cfg.get("eps", 1e-8)),
                  weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
                  mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None, mask=decay_mask))
  return tx, lr
