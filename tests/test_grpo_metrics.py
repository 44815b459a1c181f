"""GRPO stage bookkeeping: per-bucket reward means, the reward plot, dynamic-sampling refills."""

import dataclasses

import numpy as np

from r1jax.rollout import engine, sampler
from r1jax.train.losses import grpo as grpo_lib


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


def _rollout(rows, cols=6, seed=0, drafts=None):
  rng = np.random.default_rng(seed)
  extra = {} if drafts is None else dict(draft_accepted=drafts[0], draft_proposed=drafts[1],
                                         decode_steps=drafts[2])
  return sampler.Rollout(
      tokens=rng.integers(0, 50, (rows, cols + 2)).astype(np.int32),
      completion=rng.integers(0, 50, (rows, cols)).astype(np.int32),
      logprobs=-rng.random((rows, cols)).astype(np.float32),
      completion_mask=np.ones((rows, cols), bool), lengths=np.full(rows, cols, np.int32),
      truncated=np.zeros(rows, bool), prompt_lengths=np.full(rows, 2, np.int32),
      prefill_rows=rows // 2, **extra)


def test_oversampled_candidates_split_off_and_refill_flat_groups():
  """Asynchronous dynamic sampling samples the batch and its refill candidates in one call:
  split_batches cuts that call's rows into equal batches (the call's FLOPs and draft counts
  kept by the first, so swapping counts them once), and swap_groups moves a candidate group's
  rows, every token-level field included, into a flat slot."""
  G = 2  # 2 groups of 2 rows per batch, 2 batches in the call
  records = [{"answer": a} for a in ("1", "1", "2", "2", "3", "3", "4", "4")]
  texts = ["<answer>1</answer>", "<answer>1</answer>",  # batch 0, group 0: flat (both right)
           "<answer>2</answer>", "<answer>0</answer>",  # group 1: mixed
           "<answer>3</answer>", "<answer>0</answer>",  # batch 1, group 0: mixed
           "<answer>0</answer>", "<answer>0</answer>"]  # group 1: flat
  call = dataclasses.replace(_scored(records, texts), rollout=_rollout(8, drafts=(30, 40, 9)),
                             flops=100.0, drafts=(30, 40))
  batch, candidates = engine.split_batches(call, 2)
  assert batch.records == records[:4] and candidates.records == records[4:]
  np.testing.assert_array_equal(candidates.rollout.tokens, call.rollout.tokens[4:])
  np.testing.assert_array_equal(candidates.rewards, call.rewards[4:])
  assert (batch.flops, candidates.flops) == (100.0, 0.0)
  assert (batch.drafts, candidates.drafts) == ((30, 40), (0, 0))
  assert batch.rollout.decode_steps == 9 and candidates.rollout.decode_steps == 0

  _, zero_var = grpo_lib.group_advantages(batch.rewards, G)
  _, candidate_zero_var = grpo_lib.group_advantages(candidates.rewards, G)
  pairs = engine.refill_pairs(zero_var, candidate_zero_var)
  assert pairs == [(0, 0)]  # batch's flat group 0 <- the candidates' mixed group 0
  out = engine.swap_groups(batch, candidates, pairs, G)
  assert out.records == records[4:6] + records[2:4]
  np.testing.assert_array_equal(out.rollout.logprobs[:2], call.rollout.logprobs[4:6])
  np.testing.assert_array_equal(out.rollout.tokens[2:], call.rollout.tokens[2:4])
  np.testing.assert_array_equal(out.rewards, [1, 0, 1, 0])
  assert out.flops == 100.0 and out.drafts == (30, 40) and out.rollout.decode_steps == 9
  assert not grpo_lib.group_advantages(out.rewards, G)[1].any()  # no flat group left
