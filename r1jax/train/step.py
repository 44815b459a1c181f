"""One generic jitted train step; SFT, distillation and GRPO differ only in the loss plug-in.

    loss_fn(params, batch, rng, frozen) -> (loss, metrics)
      params: the full model tree (correction biases merged in); frozen: teacher / reference
      params or None; metrics may hold "_counts": {bias path: expert counts [L, E]} for the
      aux-loss-free bias update, and "_weight": the loss's normalizer (how micro-batches of
      gradient accumulation are weighted; default 1).
    step = make_step(loss_fn, tx, lr_of, ...)
    state, metrics = step(state, batch, frozen)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from r1jax.train import losses
from r1jax.train.state import TrainState, model_params, reference_params


# metrics that add up over micro-batches (the rest are weighted means)
SUMMED_METRICS = ("tokens",)


def _microbatches(batch, n: int):
  def split(x):
    assert x.shape[0] % n == 0, f"batch {x.shape[0]} not divisible by accum_steps={n}"
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.tree.map(split, batch)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_step(loss_fn: Callable, tx, lr_of=None, *, accum_steps: int = 1,
              bias_gamma: float = 0.0, nonfinite: str = "skip", donate: bool = True,
              jit: bool = True, reference_is_base: bool = False):
  """Build `step(state, batch, frozen=None) -> (state, metrics)`.

  lr_of: the learning rate of an optimizer state (make_optimizer's second value), reported as
  metrics["lr"].
  accum_steps: the batch is split into this many micro-batches, run one after another; their
  losses and gradients combine into the full batch's (weighted by the loss's normalizer, the
  metric "_weight" a loss may return: e.g. its token count for a token mean).
  reference_is_base: the loss's `frozen` argument is the state's LoRA base (GRPO's reference
  policy without a second copy of the model).
  nonfinite: "skip" leaves params and optimizer state untouched when the loss, a gradient or an
  updated parameter is not finite (metrics["nonfinite"] = 1); "stop" does the same and the caller
  stops the run.
  """
  assert nonfinite in ("skip", "stop"), nonfinite

  def step(state: TrainState, batch, frozen=None):
    rng, sub = jax.random.split(state.rng)

    ref = reference_params(state) if reference_is_base else frozen

    def loss_of(trainable, mb, r):
      return loss_fn(model_params(state, trainable), mb, r, ref)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, sub)
      metrics.pop("_weight", None)
    else:
      # micro-batch values combine as sum(value * weight) / sum(weight), where a loss's weight
      # is its normalizer (tokens for a token mean, sequences for a sequence mean): the full
      # batch's loss and gradient whatever the masks of the micro-batches
      def body(acc, inp):
        mb, r = inp
        (l, m), g = grad_fn(state.params, mb, r)
        w = m.pop("_weight", jnp.float32(1.0))
        counts = m.pop("_counts", {})
        summed = {k: m.pop(k) for k in SUMMED_METRICS if k in m}
        scaled = jax.tree.map(lambda x: x * w, (l, m, g))
        return jax.tree.map(jnp.add, acc, (*scaled, summed, counts, w)), None
      mbs = _microbatches(batch, accum_steps)
      rs = jax.random.split(sub, accum_steps)
      first = jax.tree.map(lambda x: x[0], mbs)
      (_, m0), g0 = jax.eval_shape(grad_fn, state.params, first, rs[0])
      m0 = dict(m0)
      m0.pop("_weight", None)
      counts0 = m0.pop("_counts", {})
      summed0 = {k: m0.pop(k) for k in SUMMED_METRICS if k in m0}
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           (jax.ShapeDtypeStruct((), jnp.float32), m0, g0, summed0, counts0,
                            jax.ShapeDtypeStruct((), jnp.float32)))
      (loss, metrics, grads, summed, counts, weight), _ = jax.lax.scan(body, zeros, (mbs, rs))
      total = jnp.maximum(weight, 1e-30)
      loss, metrics, grads = jax.tree.map(lambda x: x / total, (loss, metrics, grads))
      metrics.update(summed)
      metrics["_counts"] = counts

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # finite gradients can still overflow the update (e.g. a learning rate beyond float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)

    counts = metrics.pop("_counts", {})
    bias = dict(state.router_bias)
    if bias_gamma:
      for k, c in counts.items():
        bias[k] = jnp.where(finite, losses.bias_update(bias[k], c, bias_gamma), bias[k])
    if counts:
      metrics["expert_load_max_over_mean"] = jnp.max(jnp.stack(
          [losses.expert_load_max_over_mean(c) for c in counts.values()]))
    metrics.update(loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    if lr_of is not None:
      metrics["lr"] = jnp.asarray(lr_of(state.opt_state), jnp.float32)
    new = state.replace(step=state.step + 1, params=params,
                        opt_state=opt_state, router_bias=bias, rng=rng)
    return new, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0,) if donate else ())
