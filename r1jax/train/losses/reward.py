"""The reward model's loss plug-in: Bradley-Terry on preference pairs.

A batch holds pair rows (`r1jax.data.pipeline.pair_batches`): tokens, segment_ids, positions
[2P, T] and last [2P], rows 2i and 2i + 1 the chosen and the rejected completion of pair i. The
model is a sequence classifier with one label (`ModelConfig.num_labels`), scoring each row at
its last token.

    loss = mean_i -log sigmoid(r_chosen_i - r_rejected_i)
           + center_coef * mean_i (r_chosen_i + r_rejected_i)^2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax import model
from r1jax.model.config import ModelConfig
from r1jax.train.losses.supervised import moe_metrics


def pair_scores(params, batch, cfg: ModelConfig):
  """(scores [P, 2]: chosen, rejected, aux) of a pair batch."""
  scores, aux = model.reward_scores(params, batch["tokens"], cfg, last=batch["last"],
                                    segment_ids=batch["segment_ids"],
                                    positions=batch["positions"],
                                    token_mask=batch["segment_ids"] > 0)
  return scores[:, 0].reshape(-1, 2), aux


def reward_loss(cfg: ModelConfig, *, center_coef: float = 0.0, balance_alpha: float = 0.0):
  """Bradley-Terry loss over the pairs of a batch (module docstring), plus alpha * balance.
  Metrics: accuracy (the share of pairs scored the right way round), margin, the mean scores
  of each side; the normalizer is the pair count."""
  assert cfg.num_labels == 1, "a reward model scores with one label"

  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    r, aux = pair_scores(params, batch, cfg)
    margin = r[:, 0] - r[:, 1]
    bt = jnp.mean(-jax.nn.log_sigmoid(margin))
    loss = bt
    metrics = {"bt_loss": bt, "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
               "margin": jnp.mean(margin), "reward_chosen": jnp.mean(r[:, 0]),
               "reward_rejected": jnp.mean(r[:, 1]),
               "_weight": jnp.asarray(r.shape[0], jnp.float32)}
    if center_coef:
      loss = loss + center_coef * jnp.mean(jnp.sum(r, axis=1) ** 2)
    metrics.update(moe_metrics(aux, cfg, jnp.sum(batch["segment_ids"] > 0)))
    if balance_alpha and "balance" in metrics:
      loss = loss + balance_alpha * metrics["balance"]
    return loss, metrics

  return loss_fn
