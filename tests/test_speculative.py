"""Speculative decoding with the MTP draft (`rollout.speculative`, `generate(draft="mtp")`).

The draft may change the speed only: greedy tokens are those of plain greedy decoding, sampled
tokens follow the main model's sampling distribution (a statistical check of the accept /
resample rule, and log-probs equal to a full forward over the emitted tokens, which catches a
wrong cache slot, position or hole), and the MTP module on its cache computes what it computes
in training.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import flops, model
from r1jax.model import decoder
from r1jax.model.config import ModelConfig
from r1jax.rollout import engine, sampler, speculative
import testing

N_NEW = 16
ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def moe():
  spec = importlib.util.spec_from_file_location("tiny_moe",
                                                os.path.join(ROOT, "configs", "tiny_moe.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = ModelConfig.from_config(mod.get_config().model).replace(num_hidden_layers=2)
  assert cfg.num_nextn_predict_layers == 1
  return cfg, testing.jit(lambda r: model.init(cfg, r))(jax.random.key(0))


@pytest.fixture(scope="module")
def prompts():
  # 3 prompts x 2 samples (one shared prefill per pair), of different lengths (left padding)
  rng = np.random.default_rng(0)
  return [p for n in (3, 9, 14) for p in [rng.integers(2, 128, n).tolist()] * 2]


def _gen(m, prompts, **kw):
  cfg, params = m
  kw = {"eos_id": None, "rng": jax.random.key(0), "compiler_options": testing.FAST_COMPILE, **kw}
  return sampler.generate(params, cfg, prompts, max_new_tokens=N_NEW, **kw)


def test_mtp_on_its_cache_equals_the_training_forward(moe):
  """Position i of `mtp_cached` (main hidden h_i and token i + 1) gives the MTP logits that
  `forward_with_aux(mtp=True)` gives for position i, over left-padded rows."""
  cfg, params = moe
  cfg = sampler.policy_config(cfg)
  T, pad = 12, np.array([0, 3])
  tokens = np.random.default_rng(1).integers(2, 128, (2, T)).astype(np.int32)
  positions = np.maximum(np.arange(T)[None] - pad[:, None], 0).astype(np.int32)

  def cached(params, tokens):
    cache = decoder.init_cache(cfg, 2, T)
    _, _, _, hidden = decoder.forward_cached(params, tokens, positions, cache, 0,
                                             jnp.asarray(pad), cfg, return_hidden=True)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)
    logits, _ = decoder.mtp_cached(params, hidden, nxt, positions, decoder.init_mtp_cache(
        cfg, 2, T), 0, jnp.asarray(pad), cfg)
    return logits

  got = np.asarray(testing.jit(cached)(params, tokens))
  for row in range(2):  # the reference: each row unpadded
    real = tokens[row:row + 1, pad[row]:]
    _, aux = testing.jit(lambda p, t: model.forward_with_aux(p, t, cfg, mtp=True))(params, real)
    want = np.asarray(aux["mtp_logits"][0, 0])  # [T - pad, V]; the last has no next token
    np.testing.assert_allclose(got[row, pad[row]:T - 1], want[:-1], atol=2e-5, rtol=1e-5)


def test_greedy_tokens_are_plain_greedy_decoding(moe, prompts):
  plain = _gen(moe, prompts, greedy=True)
  spec = _gen(moe, prompts, greedy=True, draft="mtp")
  np.testing.assert_array_equal(spec.completion, plain.completion)
  np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=2e-5)
  assert spec.prefill_rows == 3 and spec.draft_proposed > 0
  # the steps: one per draft verified, at most one per token after the first
  assert 0 < spec.decode_steps <= N_NEW - 1


def _full_forward_logprobs(m, prompts, out):
  """log p(token) of each emitted token under a full forward over prompt + completion."""
  cfg, params = m
  seqs = [list(p) + out.completion[r, :out.lengths[r]].tolist() for r, p in enumerate(prompts)]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for row, s in enumerate(seqs):
    batch[row, :len(s)] = s
  logp = np.asarray(jax.nn.log_softmax(
      testing.jit(model.forward, static_argnums=2)(params, jnp.asarray(batch), cfg), axis=-1))
  return [logp[r, len(p) - 1 + np.arange(out.lengths[r]), out.completion[r, :out.lengths[r]]]
          for r, p in enumerate(prompts)]


def test_sampled_log_probs_are_the_full_forwards_with_holes_and_stops(moe, prompts):
  """Sampled with a stop token: rows accept different numbers of drafts (holes in the cache at
  different slots, positions advancing by one or two), some stop early; every emitted token's
  log-prob equals a full forward's over the unpadded prompt + completion."""
  out = _gen(moe, prompts, draft="mtp", stop_ids=[7, 11, 19], rng=jax.random.key(3))
  assert 0 < out.draft_accepted < out.draft_proposed  # both branches ran
  assert out.lengths.min() < N_NEW or out.truncated.all()
  for row, want in enumerate(_full_forward_logprobs(moe, prompts, out)):
    n = out.lengths[row]
    np.testing.assert_allclose(out.logprobs[row, :n], want, atol=3e-5)
    assert (out.completion[row, n:] == 0).all() and (out.logprobs[row, n:] == 0).all()
    stops = np.isin(out.completion[row, :n], [7, 11, 19])
    assert stops.sum() == (0 if out.truncated[row] else 1) and (out.truncated[row] or stops[-1])


@pytest.mark.parametrize("mesh_cfg", [dict(data=8), dict(data=2, expert=2, context=2)],
                         ids=["data8", "data2_expert2_context2"])
def test_mesh_equals_single_device(moe, mesh_cfg):
  """8 rows (4 prompts x 2) over the mesh, the experts dispatched with shard_map on the expert
  axis: the same tokens as one device, log-probs to float reassociation."""
  from r1jax import parallel
  cfg, params = moe
  rng = np.random.default_rng(2)
  rows = [p for n in (4, 6, 9, 13) for p in [rng.integers(2, 128, n).tolist()] * 2]
  one = _gen(moe, rows, draft="mtp", rng=jax.random.key(4))
  mesh = parallel.make_mesh(mesh_cfg)
  with jax.set_mesh(mesh):
    out = _gen((cfg, parallel.shard_params(params, cfg, mesh)), rows, draft="mtp",
               rng=jax.random.key(4))
  np.testing.assert_array_equal(out.completion, one.completion)
  np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-4, rtol=0)
  assert (out.draft_accepted, out.draft_proposed) == (one.draft_accepted, one.draft_proposed)


def test_noise_drawn_in_the_loop_gives_the_same_tokens(moe, prompts, monkeypatch):
  """Past `NOISE_BYTES` every step draws its own random numbers, from the same keys."""
  before = _gen(moe, prompts, draft="mtp", rng=jax.random.key(5))
  assert speculative.noise_first(len(prompts), N_NEW, moe[0].vocab_size)
  monkeypatch.setattr(sampler, "NOISE_BYTES", 0)  # a static argument: it compiles again
  assert not speculative.noise_first(len(prompts), N_NEW, moe[0].vocab_size)
  after = _gen(moe, prompts, draft="mtp", rng=jax.random.key(5))
  np.testing.assert_array_equal(after.completion, before.completion)
  np.testing.assert_allclose(after.logprobs, before.logprobs, atol=1e-6, rtol=0)


def test_same_key_same_tokens_and_the_key_matters(moe, prompts):
  a, b = (_gen(moe, prompts, draft="mtp", rng=jax.random.key(5)) for _ in range(2))
  np.testing.assert_array_equal(a.completion, b.completion)
  c = _gen(moe, prompts, draft="mtp", rng=jax.random.key(6))
  assert (a.completion != c.completion).any()


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 4)])
def test_verified_tokens_follow_the_main_models_distribution(temperature, top_k):
  """The accept / resample rule over 200k independent rows, with a draft distribution q far
  from p: the emitted token's frequencies are p's sampling distribution (tempered, top-k
  filtered) within 5 standard errors, while the drafts' are q's."""
  V, rows = 6, 200_000
  p_logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  q_logits = jnp.log(jnp.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3]))
  knobs = sampler._knobs(ModelConfig(vocab_size=V), temperature=temperature, top_k=top_k)
  filtered = top_k > 0
  p_BV, q_BV = (jnp.broadcast_to(x, (rows, V)) for x in (p_logits, q_logits))
  ka, kb, kc = jax.random.split(jax.random.key(0), 3)
  draft = speculative.draw(q_BV, sampler.gumbel_noise(ka, (rows, V)), knobs, filtered)
  token, accepted = speculative.verify(p_BV, q_BV, draft, jax.random.uniform(kb, (rows,)),
                                       sampler.gumbel_noise(kc, (rows, V)), knobs, filtered)

  def target(logits):
    z = np.asarray(logits) / temperature
    if top_k:
      z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()

  p, q = target(p_logits), target(q_logits)
  freq = np.bincount(np.asarray(token), minlength=V) / rows
  draft_freq = np.bincount(np.asarray(draft), minlength=V) / rows
  se = np.sqrt(p * (1 - p) / rows) + 1e-9
  assert np.all(np.abs(freq - p) < 5 * se + 1e-6), (freq, p)
  assert np.abs(draft_freq - q).max() < 0.01
  # acceptance rate: sum_x min(p(x), q(x))
  assert abs(float(np.mean(accepted)) - np.minimum(p, q).sum()) < 0.01


def test_greedy_verification_accepts_exactly_the_argmax():
  knobs = sampler._knobs(ModelConfig(vocab_size=4), greedy=True)
  p = jnp.array([[0.0, 3.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
  q = jnp.zeros((2, 4))
  token, accepted = speculative.verify(p, q, jnp.array([1, 3]), jnp.zeros(2), jnp.zeros((2, 4)),
                                       knobs, False)
  np.testing.assert_array_equal(token, [1, 0])
  np.testing.assert_array_equal(accepted, [True, False])


def test_draft_needs_an_mtp_module_and_no_routing_record(moe, prompts):
  cfg, params = moe
  with pytest.raises(ValueError, match="draft='mtp' needs a model with an MTP module"):
    sampler.check_draft("mtp", cfg.replace(num_nextn_predict_layers=0))
  with pytest.raises(ValueError, match="qwen2 with num_nextn_predict_layers=0 has none"):
    sampler.check_draft("mtp", ModelConfig.preset("qwen2"))
  with pytest.raises(ValueError, match="does not record routing"):
    _gen(moe, prompts, draft="mtp", record_routing=True)
  with pytest.raises(ValueError, match="must be one of"):
    _gen(moe, prompts, draft="eagle")


def test_stage_config_refuses_draft_with_routing_replay():
  from r1jax import run_config
  from r1jax.errors import ConfigError
  c = run_config.from_file(os.path.join(ROOT, "tests", "reliability", "r1_tiny_shrunk.py"))
  assert c.stages.grpo.draft == "mtp"
  run_config.validate(c)
  c.stages.grpo.routing_replay = True
  with pytest.raises(ConfigError, match="stages.grpo.draft='mtp' cannot be on with "
                                        "routing_replay"):
    run_config.validate(c)


def test_speculative_flops_count_two_tokens_and_the_mtp_layer(moe):
  cfg, _ = moe
  plain = flops.generate_flops(cfg, 8, 16, 10)
  spec = flops.speculative_flops(cfg, 8, 16, 10)
  mtp = flops.mtp_flops_per_token(cfg, 16)
  assert mtp > 0 and flops.mtp_flops_per_token(cfg.replace(num_nextn_predict_layers=0), 16) == 0
  # ten steps of two tokens each cost more than ten steps of one, less than 2.5x of them
  assert 2 * plain - flops.forward_flops(cfg, 8 * 16, 16) < spec < 2.5 * plain


def test_swap_groups_keeps_call_fields():
  """DAPO's refill swaps rows between two generate calls: the per-row arrays move, the
  call-level fields (prefill rows, draft counts) are not indexed as rows. (It raised an
  IndexError on the first refill once the rollout carried `prefill_rows`.)"""
  def scored(value, accepted):
    B = 4
    ro = sampler.Rollout(tokens=np.full((B, 6), value), completion=np.full((B, 3), value),
                         logprobs=np.full((B, 3), float(value)),
                         completion_mask=np.ones((B, 3), bool), lengths=np.full(B, value),
                         truncated=np.zeros(B, bool), prompt_lengths=np.full(B, 3),
                         prefill_rows=2, draft_accepted=accepted, draft_proposed=10,
                         decode_steps=5)
    return engine.ScoredRollout(records=[{"v": value}] * B, prompts=["q"] * B,
                                completions=[str(value)] * B, rollout=ro,
                                rewards=np.full(B, float(value), np.float32),
                                per_reward={"accuracy": [float(value)] * B}, reward_errors={},
                                flops=1.0)

  out = engine.swap_groups(scored(1, 7), scored(2, 3), [(1, 0)], group_size=2)
  np.testing.assert_array_equal(out.rollout.tokens[:, 0], [1, 1, 2, 2])
  np.testing.assert_array_equal(out.rewards, [1, 1, 2, 2])
  assert out.rollout.prefill_rows == 2 and out.flops == 2.0
  assert (out.rollout.draft_accepted, out.rollout.draft_proposed,
          out.rollout.decode_steps) == (10, 20, 10)


def test_evaluation_and_rejection_sampling_draft_with_mtp(moe, tmp_path):
  """`eval.draft="mtp"`: greedy evaluation writes the same completions as plain decoding and
  reports the drafts' acceptance; a model without an MTP module (the dense student) decodes
  plainly. `engine.rollout` in several calls (`batch_size`, as rejection sampling and
  evaluation run it) sums the draft counts of all calls."""
  import json
  import types
  import ml_collections
  from r1jax import recipe, run_config
  from r1jax.data.tokenizer import get_tokenizer
  from r1jax.parallel import make_mesh
  from r1jax.stages import evaluate
  cfg, params = moe
  c = run_config.from_file(os.path.join(ROOT, "configs", "r1_tiny.py"))
  records = recipe.make_splits(c)["eval"][:6]
  ctx = types.SimpleNamespace(tokenizer=get_tokenizer("char"), is_main=True, workdir=tmp_path,
                              mesh=make_mesh({"data": 1}, jax.devices()[:1]))
  (tmp_path / "samples").mkdir()

  def run(model_cfg, model_params, draft, stage, k=2):
    eval_cfg = ml_collections.ConfigDict(dict(k=k, temperature=1.0, top_p=1.0, max_new_tokens=10,
                                              greedy=True, draft=draft, batch_size=4))
    out = evaluate.evaluate(ctx, model_cfg, model_params, records, seed=0, template="r1",
                            eval_cfg=eval_cfg, stage=stage)
    lines = (tmp_path / "samples" / f"eval_{stage}.jsonl").read_text().splitlines()
    return out, [json.loads(line)["completion"] for line in lines]

  plain, plain_text = run(cfg, params, "", "plain")
  spec, spec_text = run(cfg, params, "mtp", "spec")
  assert spec_text == plain_text and spec["accuracy"] == plain["accuracy"]
  assert "draft_accept_rate" not in plain and 0 < spec["draft_accept_rate"] <= 1
  student = ModelConfig.from_config(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, model_type="qwen2"))
  s_params = testing.jit(lambda r: model.init(student, r))(jax.random.key(0))
  out, _ = run(student, s_params, "mtp", "student", k=0)
  assert "draft_accept_rate" not in out
  scored = engine.rollout(params, cfg, records, tokenizer=ctx.tokenizer, mesh=ctx.mesh,
                          template="r1", rng=jax.random.key(0), repeats=2, batch_size=4,
                          sampling=engine.Sampling(max_new_tokens=10, draft="mtp"))
  assert scored.rollout is None  # three calls of 4 rows
  assert scored.drafts[1] >= 12 and 0 < scored.draft_accept_rate <= 1
