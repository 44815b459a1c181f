"""GRPO stage bookkeeping: the per-bucket reward means `grpo.score` logs."""

import types

import numpy as np

from r1jax.data.tokenizer import CharTokenizer
from r1jax.stages import grpo


def test_score_reports_reward_means_per_bucket():
  tok = CharTokenizer()
  records = [{"answer": "8", "bucket": "covered"}, {"answer": "9", "bucket": "covered"},
             {"answer": "16", "bucket": "uncovered"}, {"answer": "17", "bucket": "uncovered"}]
  texts = ["4+4=8</think><answer>8</answer>", "no answer", "<answer>16</answer>",
           "<answer>3</answer>"]
  ids = [tok.encode(t) for t in texts]
  width = max(map(len, ids))
  completion = np.zeros((len(ids), width), np.int32)
  for i, row in enumerate(ids):
    completion[i, :len(row)] = row
  rollout = types.SimpleNamespace(completion=completion,
                                  lengths=np.array([len(r) for r in ids]))
  ctx = types.SimpleNamespace(tokenizer=tok)
  _, total, means = grpo.score(ctx, records, rollout, {"accuracy": 1.0}, ["q"] * 4)
  np.testing.assert_allclose(total, [1, 0, 1, 0])
  assert means["reward_accuracy"] == 0.5
  assert means["reward_accuracy_covered"] == 0.5
  assert means["reward_accuracy_uncovered"] == 0.5
  records[3]["answer"] = "3"
  _, _, means = grpo.score(ctx, records, rollout, {"accuracy": 1.0}, ["q"] * 4)
  assert means["reward_accuracy_uncovered"] == 1.0 and means["reward_accuracy_covered"] == 0.5


def test_bucket_reward_plot(tmp_path):
  """The run log draws reward_by_bucket.png from the per-bucket GRPO records (and nothing when
  there are none)."""
  from r1jax import runlog
  log = runlog.RunLog(str(tmp_path), tensorboard=False)
  log.plot()
  assert not (tmp_path / "plots" / "reward_by_bucket.png").exists()
  for step in range(1, 13):
    log.metrics("grpo", step, {"reward": 0.5, "reward_accuracy_covered": 0.6,
                               "reward_accuracy_uncovered": step / 100})
  log.plot()
  assert (tmp_path / "plots" / "reward_by_bucket.png").stat().st_size > 1000
  log.close()


def test_refill_pairs_use_every_mixed_candidate():
  """Each zero-variance slot gets the next mixed fresh group, wherever it sits in the refill
  batch; slots beyond the mixed supply stay, and so do mixed slots."""
  zero_var = np.array([False, True, True, False, True])
  candidates = np.array([True, False, True, True, False])
  assert grpo.refill_pairs(zero_var, candidates) == [(1, 1), (2, 4)]
  assert grpo.refill_pairs(zero_var, np.array([False] * 5)) == [(1, 0), (2, 1), (4, 2)]
  assert grpo.refill_pairs(zero_var, np.array([True] * 5)) == []
  assert grpo.refill_pairs(np.array([False, False]), np.array([False, False])) == []
