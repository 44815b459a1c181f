"""The `reward_model` reward: a reward model (a sequence classifier with one label) scores each
completion after its prompt.

    scorer = reward_model.ModelReward(cfg, params, tokenizer, mesh, max_len=512)
    with rewards.bind("reward_model", scorer):
      scored = engine.rollout(..., reward_weights={"reward_model": 1.0, "format": 0.2})

A row is the formatted prompt then the completion text (`pipeline.reward_row`, as the
reward-model stage trains on it), scored at its last token. Rows go through one jitted forward
on the run's mesh, split over its batch axes; the scores come back replicated, so every process
(each scores every row, as for the rule rewards) holds all of them. Row counts are padded to a
multiple of the batch devices and lengths to a multiple of `bucket`, so a GRPO stage compiles
the forward once per length bucket. `flops` sums the model FLOPs of the forwards run.
`Ensemble` combines several such scorers into one reward (their mean or minimum per row).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from r1jax import flops, model, parallel
from r1jax.data import pipeline
from r1jax.model.config import ModelConfig


ENSEMBLE_AGGREGATES = ("mean", "min")


class Ensemble:
  """Several reward models as one reward: each row's score is the mean of theirs, or the
  lowest ("min", the conservative choice: a completion scores high only if every model agrees).
  Reward-model ensembles are one of the usual checks on reward hacking (Coste et al. 2023;
  Eisenstein et al. 2023). `flops` sums the members'."""

  def __init__(self, members, aggregate: str = "mean"):
    assert aggregate in ENSEMBLE_AGGREGATES, aggregate
    self.members, self.aggregate = list(members), aggregate

  @property
  def flops(self) -> float:
    return sum(m.flops for m in self.members)

  def __call__(self, prompts, completions, **fields) -> list[float]:
    scores = np.asarray([m(prompts, completions, **fields) for m in self.members])
    if scores.size == 0:
      return []
    out = scores.min(axis=0) if self.aggregate == "min" else scores.mean(axis=0)
    return out.tolist()


@functools.lru_cache(maxsize=None)
def _scores_fn(cfg: ModelConfig, mesh):
  """The jitted scoring forward of one architecture on one mesh, shared by every scorer of it
  (an ensemble's members compile it once per length bucket, not once each)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def scores(params, batch):
    out, _ = model.reward_scores(params, batch["tokens"], cfg, last=batch["last"],
                                 segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 token_mask=batch["segment_ids"] > 0)
    return out[:, 0]

  return jax.jit(scores, out_shardings=replicated)


class ModelReward:
  """Callable as a reward function: (prompts, completions, **fields) -> list of scores."""

  def __init__(self, cfg: ModelConfig, params, tokenizer, mesh, *, max_len: int,
               bucket: int = 16):
    assert cfg.num_labels == 1, "a reward model scores with one label"
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    self.max_len, self.bucket = max_len, bucket
    self.flops = 0.0
    self.row_multiple = parallel.batch_devices(mesh)
    self._scores = _scores_fn(cfg, mesh)

  def __call__(self, prompts, completions, **_) -> list[float]:
    rows = [pipeline.reward_row(self.tokenizer, p, c, self.max_len)
            for p, c in zip(prompts, completions)]
    n = len(rows)
    if n == 0:
      return []
    T = min(self.max_len, -(-max(len(r) for r in rows) // self.bucket) * self.bucket)
    B = -(-n // self.row_multiple) * self.row_multiple
    rows += [rows[-1]] * (B - n)  # padding rows: scored and dropped
    batch = parallel.global_batch(pipeline.reward_rows(rows, T), self.mesh)
    with jax.set_mesh(self.mesh):
      out = np.asarray(self._scores(self.params, batch))
    self.flops += flops.forward_flops(self.cfg, B * T, T)
    return out[:n].astype(np.float64).tolist()
