"""GRPO stage bookkeeping: per-bucket reward means, the reward plot, dynamic-sampling refills."""

import numpy as np

from r1jax.rollout import engine


def _scored(records, texts):
  total, per_fn, errors = engine.score(records, ["q"] * len(texts), texts, {"accuracy": 1.0})
  return engine.ScoredRollout(records=records, prompts=["q"] * len(texts), completions=texts,
                              rollout=None, rewards=total, per_reward=per_fn,
                              reward_errors=errors, flops=0.0)


def test_score_reports_reward_means_per_bucket():
  records = [{"answer": "8", "bucket": "covered"}, {"answer": "9", "bucket": "covered"},
             {"answer": "16", "bucket": "uncovered"}, {"answer": "17", "bucket": "uncovered"}]
  texts = ["4+4=8</think><answer>8</answer>", "no answer", "<answer>16</answer>",
           "<answer>3</answer>"]
  scored = _scored(records, texts)
  np.testing.assert_allclose(scored.rewards, [1, 0, 1, 0])
  means = scored.reward_means()
  assert means["reward_accuracy"] == 0.5
  assert means["reward_accuracy_covered"] == 0.5
  assert means["reward_accuracy_uncovered"] == 0.5
  records[3]["answer"] = "3"
  means = _scored(records, texts).reward_means()
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
  assert engine.refill_pairs(zero_var, candidates) == [(1, 1), (2, 4)]
  assert engine.refill_pairs(zero_var, np.array([False] * 5)) == [(1, 0), (2, 1), (4, 2)]
  assert engine.refill_pairs(zero_var, np.array([True] * 5)) == []
  assert engine.refill_pairs(np.array([False, False]), np.array([False, False])) == []
