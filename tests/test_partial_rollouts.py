"""Partial rollouts (`rollout.partial`, GRPO's `partial_tokens`): completions decoded a few
tokens per generate call, rows carried across calls and steps, groups handed to the update once
all their rows finished.

Continuing a row must be decoding it without the break: greedy segments give plain greedy
decoding's tokens, and sampled segments' log-probs are a full forward's over the assembled rows
(wrong positions, padding or a lost token would show). The buffer's JSON state resumes the same
rows.
"""

import copy
import json
import os
import types

import jax
import numpy as np
import pytest

from r1jax import model, recipe, run_config
from r1jax.data.tokenizer import get_tokenizer
from r1jax.model.config import ModelConfig
from r1jax.parallel import make_mesh
from r1jax.rollout import engine, partial, sampler
from r1jax.stages import grpo as grpo_stage
from r1jax.train.losses import grpo
import testing

ROOT = os.path.join(os.path.dirname(__file__), "..")
G, N, SEGMENT = 2, 12, 3


@pytest.fixture(scope="module")
def setup():
  """r1_tiny's model (2 layers, weights x3: peaked distributions), its RL prompts and char
  tokenizer, with the stop token moved to a token this model emits often, so rows stop at
  different lengths."""
  c = run_config.from_file(os.path.join(ROOT, "configs", "r1_tiny.py"))
  cfg = sampler.policy_config(ModelConfig.from_config(c.model).replace(num_hidden_layers=2))
  params = testing.jit(lambda r: jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x,
                                              model.init(cfg, r)))(jax.random.key(0))
  records = recipe.make_splits(c)["rl"][:12]
  char = get_tokenizer("char")
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  probe = engine.rollout(params, cfg, records, tokenizer=char, mesh=mesh, template="r1",
                         sampling=engine.Sampling(max_new_tokens=N, greedy=True),
                         rng=jax.random.key(0)).rollout.completion
  # the stop token: of the tokens greedy decoding emits, the one whose first appearances in the
  # rows fall on the most different positions, so rows stop at different lengths (greedy and
  # sampled alike)
  def spread(t):
    firsts = [int(np.argmax(row == t)) for row in probe if (row == t).any()]
    return len(set(firsts)) + len(firsts) / 100
  eos = max((t for t in np.unique(probe) if t not in (char.pad_id, char.eos_id)), key=spread)
  tok = types.SimpleNamespace(encode=char.encode, decode=char.decode, eos_id=eos,
                              pad_id=char.pad_id, vocab_size=char.vocab_size,
                              markers=char.markers)
  return cfg, params, records, tok, mesh


def _batches(setup, sampling, steps, groups, rows, buffer=None, key=0):
  cfg, params, records, tok, mesh = setup
  buffer = buffer or partial.PartialRollouts(G, SEGMENT, N)
  draws = iter([records[i:i + 2] for i in range(0, len(records), 2)] * 4)
  out = []
  for step in range(steps):
    out.append(buffer.next_batch(params, cfg, draw=lambda: next(draws), groups=groups,
                                 rows=rows, rng=jax.random.key(100 * key + step),
                                 tokenizer=tok, mesh=mesh, template="r1", sampling=sampling,
                                 reward_weights={"accuracy": 1.0}))
  return out, buffer


def test_greedy_segments_decode_what_plain_greedy_decoding_does(setup):
  """Segments of 3 tokens, calls of 3 groups' rows, one group per step (10 of the 12 prompts): the rows of every
  group handed over are plain greedy decoding of its prompt (the same tokens to the stop token
  or N, log-probs to float rounding), though they ran in different calls next to other
  groups' rows, and groups finished out of their start order wait for the update."""
  cfg, params, records, tok, mesh = setup
  out, buffer = _batches(setup, engine.Sampling(N, greedy=True), steps=10, groups=1,
                         rows=3 * G)
  lengths = set()
  for scored, stats in out:
    plain = engine.rollout(params, cfg, scored.records[::G], tokenizer=tok, mesh=mesh,
                           template="r1", sampling=engine.Sampling(N, greedy=True),
                           rng=jax.random.key(0), repeats=G)
    got, want = scored.rollout, plain.rollout
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.truncated, want.truncated)
    np.testing.assert_array_equal(got.tokens[:, -N:], want.tokens[:, -N:])
    np.testing.assert_array_equal(got.tokens, want.tokens)  # the same left-padded prompts
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    assert scored.completions == plain.completions
    lengths |= set(got.lengths.tolist())
  assert len(lengths) >= 3, lengths  # rows stopped at different points
  assert any(s["stale_token_frac"] > 0 for _, s in out)  # some rows ran over two steps
  assert buffer.groups  # rows still in flight


def test_sampled_segments_have_the_policys_logprobs(setup):
  """Sampled segments (temperature 1), rows carried across steps: each handed-over batch's
  log-probs are those of a full forward over its assembled rows, where the policy did not
  change (the GRPO update's ratio at the sampling parameters is 1 to 3e-5)."""
  cfg, params, _, _, _ = setup
  out, _ = _batches(setup, engine.Sampling(N), steps=4, groups=2, rows=3 * G, key=1)
  assert any(s["stale_token_frac"] > 0 for _, s in out)
  loss = testing.jit(grpo.grpo_loss(cfg, budget=N))
  for scored, _ in out:
    adv, _ = grpo.group_advantages(np.arange(scored.size, dtype=np.float32), G)
    batch = jax.tree.map(np.asarray, grpo_stage.grpo_batch(scored.rollout, adv,
                                                           mask_truncated=False))
    _, m = loss(params, batch, None, None)
    assert float(m["tokens"]) == float(np.sum(scored.rollout.lengths))
    assert abs(float(m["mismatch_ratio_max"]) - 1) < 3e-5, m
    assert abs(float(m["mismatch_ratio_min"]) - 1) < 3e-5, m


def test_the_buffer_state_resumes_the_same_rows(setup):
  """The state after step 2, through JSON (as a checkpoint stores it), continues as the
  buffer that was never stopped: steps 3 and 4 hand over the same rows and log-probs."""
  sampling = engine.Sampling(N)
  first, buffer = _batches(setup, sampling, steps=2, groups=2, rows=3 * G, key=2)
  assert buffer.groups  # rows in flight at the "checkpoint"
  saved = json.loads(json.dumps(buffer.state()))
  twin = partial.PartialRollouts(G, SEGMENT, N)
  twin.set_state(saved)
  keep = copy.deepcopy(buffer.state())
  cfg, params, records, tok, mesh = setup

  def more(b):
    draws = iter([records[i:i + 2] for i in range(8, 12, 2)] * 4)
    return [b.next_batch(params, cfg, draw=lambda: next(draws), groups=2, rows=3 * G,
                         rng=jax.random.key(300 + step), tokenizer=tok, mesh=mesh,
                         template="r1", sampling=sampling, reward_weights={"accuracy": 1.0})
            for step in range(2)]

  a, b = more(buffer), more(twin)
  assert keep == saved  # set_state copied it
  for (sa, ta), (sb, tb) in zip(a, b):
    assert ta == tb and sa.completions == sb.completions
    np.testing.assert_array_equal(sa.rollout.tokens, sb.rollout.tokens)
    np.testing.assert_array_equal(sa.rollout.logprobs, sb.rollout.logprobs)
  assert buffer.state() == twin.state()


def test_stage_config_refuses_partial_rollouts_it_cannot_do():
  from r1jax.errors import ConfigError
  c = run_config.from_file(os.path.join(ROOT, "tests", "reliability", "r1_tiny_shrunk.py"))
  s = c.stages.grpo
  run_config.validate(c)
  for change, message in (
      (dict(partial_tokens=s.max_new_tokens), "partial_tokens=12 must be in [0, "
                                               "max_new_tokens=12)"),
      (dict(partial_tokens=4, staleness=1, dynamic_sampling=False),
       "partial_tokens=4 cannot be on with staleness >= 1"),
      (dict(partial_tokens=4, routing_replay=True, draft=""),
       "partial_tokens=4 cannot be on with routing_replay")):
    bad = copy.deepcopy(c)
    bad.stages.grpo.update(change)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
      run_config.validate(bad)
