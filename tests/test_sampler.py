"""KV-cache sampler: decode log-probs and greedy tokens equal a full forward over the generated
sequences, stops, filters, rng and an 8-device data mesh.

The references run one right-padded batch through `model.forward`: causal attention makes each
row's logits those of its unpadded prompt + completion.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import model, parallel
from r1jax.model.config import ModelConfig
from r1jax.rollout import sampler
import testing

N_NEW = 10
PROMPT_LENS = (3, 7, 12, 3, 7, 12, 5, 9)  # batch 8 so the mesh test reuses the prompts


def _scaled_init(cfg):
  # x5 on matrices: logits far from uniform, so a wrong token or offset moves log-probs a lot
  def init(rng):
    return jax.tree.map(lambda x: x * 5 if x.ndim >= 2 else x, model.init(cfg, rng))
  return testing.jit(init)(jax.random.key(0))


@pytest.fixture(scope="module")
def moe():
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_moe.py")
  spec = importlib.util.spec_from_file_location("tiny_moe", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = ModelConfig.from_config(mod.get_config().model).replace(num_hidden_layers=2)
  return cfg, _scaled_init(cfg)


@pytest.fixture(scope="module")
def student():
  cfg = ModelConfig.preset("qwen2").replace(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
  return cfg, _scaled_init(cfg)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(2, 128, n).tolist() for n in PROMPT_LENS]


def _gen(m, prompts, **kw):
  cfg, params = m
  kw = {"eos_id": None, "rng": jax.random.key(0), "compiler_options": testing.FAST_COMPILE, **kw}
  return sampler.generate(params, cfg, prompts, max_new_tokens=N_NEW, **kw)


def _full_forward_logprobs(m, prompts, completion):
  """log_softmax of model.forward at each completion position: [B, N, V]."""
  cfg, params = m
  seqs = [list(p) + list(c) for p, c in zip(prompts, completion)]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for row, s in enumerate(seqs):
    batch[row, :len(s)] = s
  logits = testing.jit(model.forward, static_argnums=2)(params, jnp.asarray(batch), cfg)
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return np.stack([logp[row, len(p) - 1 + np.arange(N_NEW)] for row, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def moe_sampled(moe, prompts):
  return _gen(moe, prompts)


@pytest.fixture(scope="module")
def moe_greedy(moe, prompts):
  return _gen(moe, prompts, greedy=True)


@pytest.mark.parametrize("which", ["moe", "student"])
def test_decode_logprobs_equal_full_forward(which, request, prompts):
  m = request.getfixturevalue(which)
  out = request.getfixturevalue("moe_sampled") if which == "moe" else _gen(m, prompts)
  assert out.completion_mask.all() and not out.lengths.min() < N_NEW
  P = out.tokens.shape[1] - N_NEW
  assert P == 16  # longest prompt 12, bucketed to 16
  for row, p in enumerate(prompts):
    np.testing.assert_array_equal(out.tokens[row, P - len(p):P], p)
    assert (out.tokens[row, :P - len(p)] == 0).all()
  np.testing.assert_array_equal(out.tokens[:, P:], out.completion)
  np.testing.assert_array_equal(out.prompt_lengths, PROMPT_LENS)
  ref = _full_forward_logprobs(m, prompts, out.completion)
  ref_lp = np.take_along_axis(ref, out.completion[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs, ref_lp, atol=1e-4, rtol=0)
  assert ref_lp.std() > 0.5  # the test model is far from uniform


def test_greedy_is_argmax_of_full_forward(moe, prompts, moe_greedy):
  ref = _full_forward_logprobs(moe, prompts, moe_greedy.completion)
  np.testing.assert_array_equal(moe_greedy.completion, ref.argmax(-1))
  np.testing.assert_allclose(moe_greedy.logprobs, ref.max(-1), atol=1e-4, rtol=0)
  assert len(np.unique(moe_greedy.completion)) > 5


def test_stop_tokens_end_rows_and_pad_after(moe, prompts, moe_greedy):
  free = moe_greedy.completion
  # a token that some rows, but not all, generate: those rows must stop at its first occurrence
  rows_with = {t: {r for r in range(len(free)) if t in free[r]} for t in np.unique(free)}
  stop = next(t for t, rows in rows_with.items() if 0 < len(rows) < len(free) - 1)
  first = [list(r).index(stop) + 1 if stop in r else N_NEW for r in free]
  want_len = np.asarray(first)
  unused = int(np.setdiff1d(np.arange(128), free)[0])
  for kw in (dict(eos_id=int(stop)), dict(eos_id=None, stop_ids=(int(stop), unused))):
    out = _gen(moe, prompts, greedy=True, pad_id=0, **kw)
    np.testing.assert_array_equal(out.lengths, want_len)
    np.testing.assert_array_equal(out.truncated, [stop not in r for r in free])
    mask = np.arange(N_NEW)[None] < want_len[:, None]
    np.testing.assert_array_equal(out.completion_mask, mask)
    np.testing.assert_array_equal(out.completion, np.where(mask, free, 0))
    np.testing.assert_array_equal(out.logprobs, np.where(mask, moe_greedy.logprobs, 0))
  assert want_len.min() < N_NEW and out.truncated.any()


def test_top_k_1_and_tiny_top_p_equal_greedy(student, prompts):
  greedy = _gen(student, prompts, greedy=True)
  sampled = _gen(student, prompts, rng=jax.random.key(1))
  assert (sampled.completion != greedy.completion).any()
  for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6, temperature=2.0)):
    out = _gen(student, prompts, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(out.completion, greedy.completion, err_msg=str(kw))
    want = greedy.logprobs
    if "temperature" in kw:  # log-probs of softmax(logits / T), before top-k / top-p
      full = _full_forward_logprobs(student, prompts, out.completion) / kw["temperature"]
      full = full - jax.scipy.special.logsumexp(full, axis=-1, keepdims=True)
      want = np.where(out.completion_mask, np.take_along_axis(
          np.asarray(full), out.completion[..., None], -1)[..., 0], 0)
      assert np.abs(want - greedy.logprobs).max() > 0.1  # the temperature is in them
    np.testing.assert_allclose(out.logprobs, want, atol=2e-5, err_msg=str(kw))
  # top-k = 2 only ever picks one of the two most likely tokens
  out = _gen(student, prompts, rng=jax.random.key(2), top_k=2, temperature=5.0)
  ref = _full_forward_logprobs(student, prompts, out.completion)
  rank = (ref > np.take_along_axis(ref, out.completion[..., None], -1)).sum(-1)
  assert rank.max() == 1


def test_same_rng_same_output_different_rng_different(moe, prompts, moe_sampled):
  again = _gen(moe, prompts, rng=jax.random.key(0))
  np.testing.assert_array_equal(again.completion, moe_sampled.completion)
  np.testing.assert_array_equal(again.logprobs, moe_sampled.logprobs)
  other = _gen(moe, prompts, rng=jax.random.key(1))
  assert (other.completion != moe_sampled.completion).mean() > 0.3


def test_sampling_is_categoricals_with_noise_drawn_first_or_per_step(moe, prompts, moe_sampled,
                                                                    monkeypatch):
  """Each token is jax.random.categorical's draw from the step's key: argmax(logits + Gumbel
  noise). The noise of every step is drawn before the decode loop when it is small (fewer ops per
  step), else in each step; both give the same rollout."""
  logits = 3 * jax.random.normal(jax.random.key(1), (64, 128))
  knobs = {"vocab_limit": 128, "temperature": np.float32(1.0), "greedy": False}
  for seed in range(4):
    key = jax.random.key(seed)
    token, _ = sampler.sample_token(logits, key, knobs, False)
    np.testing.assert_array_equal(token, jax.random.categorical(key, logits, axis=-1))
  monkeypatch.setattr(sampler, "NOISE_BYTES", 0)  # every step draws its own noise
  per_step = _gen(moe, prompts)
  np.testing.assert_array_equal(per_step.completion, moe_sampled.completion)
  np.testing.assert_array_equal(per_step.logprobs, moe_sampled.logprobs)


@pytest.mark.parametrize("mesh_cfg", [dict(data=8), dict(data=2, expert=2, context=2)],
                         ids=["data8", "data2_expert2_context2"])
def test_data_mesh_equals_single_device(moe, prompts, moe_sampled, mesh_cfg):
  """On a context mesh the context devices take rows too (a decode step has no positions to
  split): the 8 rows over data x expert x context."""
  cfg, params = moe
  mesh = parallel.make_mesh(mesh_cfg)
  with jax.set_mesh(mesh):
    out = _gen((cfg, parallel.shard_params(params, cfg, mesh)), prompts)
  np.testing.assert_array_equal(out.completion, moe_sampled.completion)
  # summation order differs across devices (float reassociation), not the maths
  np.testing.assert_allclose(out.logprobs, moe_sampled.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("greedy", [False, True])
def test_shared_prefill_equals_one_prefill_per_row(moe, prompts, greedy):
  """Runs of G identical prompts (GRPO's groups) are prefilled once per run: the same tokens and
  log-probs (to float rounding) as a prefill of every row, on a data mesh too. Routing replay's
  recorded experts are copied to every row of a run."""
  cfg, params = moe
  grouped = [p for p in prompts[:4] for _ in range(4)]  # 4 distinct prompts x 4 samples
  shared = _gen(moe, grouped, greedy=greedy, record_routing=True)
  each = _gen(moe, grouped, greedy=greedy, record_routing=True, share_prefill=False)
  assert sampler.prompt_groups(grouped) == 4
  assert (shared.prefill_rows, each.prefill_rows) == (4, 16)
  np.testing.assert_array_equal(shared.completion, each.completion)
  np.testing.assert_allclose(shared.logprobs, each.logprobs, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(shared.routing, each.routing)
  if not greedy:  # the samples of one prompt differ: each row keeps its own rng stream
    assert len({tuple(r) for r in shared.completion[:4]}) > 1
  mesh = parallel.make_mesh(dict(data=8))
  with jax.set_mesh(mesh):
    meshed = _gen((cfg, parallel.shard_params(params, cfg, mesh)), grouped, greedy=greedy)
  np.testing.assert_array_equal(meshed.completion, each.completion)


@pytest.mark.parametrize("which", ["moe", "student"])
def test_prefill_last_only_is_the_last_positions_logits(which, request, prompts):
  """The prefill's `forward_cached(last_only=True)` (the head on the last position) gives the
  full prefill's last-position logits, and the same cache."""
  from r1jax.model import decoder
  cfg, params = request.getfixturevalue(which)
  tokens, pad = sampler.left_pad(prompts, 0)
  tokens = jnp.asarray(tokens)
  positions = jnp.maximum(jnp.arange(tokens.shape[1])[None, :] - pad[:, None], 0)
  cache = decoder.init_cache(cfg, tokens.shape[0], tokens.shape[1] + 2)
  run = testing.jit(lambda last: decoder.forward_cached(params, tokens, positions, cache, 0,
                                                       jnp.asarray(pad), cfg, last_only=last),
                    static_argnums=0)
  (full, cache_full, _), (last, cache_last, _) = run(False), run(True)
  assert last.shape == (tokens.shape[0], 1, cfg.vocab_size)
  np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, cache_last, cache_full)


def test_prompt_groups_needs_every_run_identical():
  assert sampler.prompt_groups([[1], [1], [2], [2]]) == 2
  assert sampler.prompt_groups([[1], [1], [1], [1]]) == 4
  assert sampler.prompt_groups([[1], [2], [1], [2]]) == 1
  assert sampler.prompt_groups([[1], [1], [2], [3]]) == 1  # the second run is not one prompt
  assert sampler.prompt_groups([[1], [1], [2]]) == 1  # 3 rows do not split into runs of 2
  assert sampler.prompt_groups([[1, 2], [1, 2], [1, 3], [1, 3]]) == 2


def test_policy_config_keeps_the_moe_dropless(moe, student):
  cfg = moe[0].replace(moe_impl="capacity", capacity_factor=1.25)  # drops assignments
  dec = sampler.policy_config(cfg)
  assert (dec.moe_impl, dec.capacity_factor) == ("blocked", None)
  ragged = cfg.replace(moe_impl="ragged_dot", capacity_factor=1.25)
  assert sampler.policy_config(ragged).capacity_factor is None
  assert sampler.policy_config(student[0]) == student[0]


def _replay_inputs(out):
  """The update's view of a rollout: input tokens (all but the last), their segment ids and
  positions, and the recorded expert ids aligned with them."""
  toks = out.tokens[:, :-1]
  P = out.tokens.shape[1] - N_NEW
  t = np.arange(toks.shape[1])[None]
  pad = (P - out.prompt_lengths)[:, None]
  seg = (t >= pad).astype(np.int32)
  return toks, seg, np.maximum(t - pad, 0).astype(np.int32), out.routing[:, :-1]


def test_routing_replay_records_and_replays_the_samplers_experts(moe, prompts):
  """R3: the sampler records the experts of every input token (prefill and decode); the
  training forward given them uses exactly those, also after a parameter update that changes
  the router's own top-k, while the router still receives a gradient through the gate
  weights of the replayed experts."""
  cfg, params = moe
  pcfg = sampler.policy_config(cfg)
  out = _gen(moe, prompts, record_routing=True)
  L_moe, k = cfg.num_moe_layers, cfg.num_experts_per_tok
  assert out.routing.shape == (len(prompts), out.tokens.shape[1], L_moe, k)
  toks, seg, pos, routing = _replay_inputs(out)
  real = seg > 0
  fwd = testing.jit(lambda p, r: model.forward_with_aux(
      p, toks, pcfg, segment_ids=seg, positions=pos, token_mask=real, routing=r)[1]["expert_ids"])
  recorded = np.moveaxis(np.asarray(fwd(params, None)), 0, 2)
  np.testing.assert_array_equal(recorded[real], routing[real])  # sampler == trainer, untouched
  # an update: perturb the routers, so the top-k changes for many tokens
  moved = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)
      if "router" in jax.tree_util.keystr(path) and x.ndim > 1 else x, params)
  fresh = np.moveaxis(np.asarray(fwd(moved, None)), 0, 2)
  assert np.mean(np.any(fresh[real] != routing[real], -1)) > 0.2
  replayed = np.moveaxis(np.asarray(fwd(moved, jnp.asarray(routing))), 0, 2)
  np.testing.assert_array_equal(replayed[real], routing[real])

  def loss(p):
    logits = model.forward(p, toks, pcfg, segment_ids=seg, positions=pos, token_mask=real,
                           routing=jnp.asarray(routing))
    return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2) * 1e-6
  grad = testing.jit(jax.grad(loss))(moved)
  assert float(jnp.abs(grad["moe_layers"]["moe"]["router"]).max()) > 0


def test_truncate_at_stop_strings():
  texts = ["a</answer>b</s>", "no stop", "x</s>y</answer>"]
  stops = ["</answer>", "</s>"]
  assert sampler.truncate_at_stop_strings(texts, stops) == ["a</answer>", "no stop", "x</s>"]
  assert sampler.truncate_at_stop_strings(texts, stops, include_stop=False) == ["a", "no stop", "x"]


def test_bad_arguments_are_reported(student):
  cfg, params = student
  with pytest.raises(ValueError, match="at least one token"):
    sampler.generate(params, cfg, [[1], []], max_new_tokens=2, rng=jax.random.key(0), eos_id=1)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    sampler.generate(params, cfg, [[1]], max_new_tokens=256, rng=jax.random.key(0), eos_id=1)
