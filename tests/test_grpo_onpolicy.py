"""GRPO is on-policy by construction: in every shipped config with a GRPO stage, the first update
scores the sampled tokens with the policy that sampled them, so the ratio is 1 up to float noise
and nothing is clipped.

For each such config (its model, tokenizer, template, rewards, loss and R3 settings; a small
batch of its RL prompts, the weights scaled so the distributions are far from uniform), one
rollout goes through the stage's own path (rollout.engine -> stages.grpo.grpo_batch) and the
stage's loss is evaluated at the sampling parameters: |ratio - 1| < 1e-5 on every completion
token and mismatch_clip_frac = 0. A negative control shows the check can fail: scored with the
training config's capacity-limited MoE (what the update used before it shared the sampler's
policy config), the same tokens get different log-probs.
"""

import contextlib
import dataclasses
import glob
import os

import jax
import numpy as np
import pytest

from r1jax import hf, launch, model, parallel, recipe, run_config
from r1jax.checkpoint import sources
from r1jax.model.config import ModelConfig
from r1jax.data.tokenizer import get_tokenizer
from r1jax.parallel import make_mesh
from r1jax.rollout import engine, sampler
from r1jax.stages import grpo as grpo_stage
from r1jax.train.losses import grpo
import testing

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPTS, MAX_NEW = 2, 16


def _grpo_configs():
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    c = launch.parse_config(["launch", "--config", path])
    stages = run_config.stage_configs(c)
    kinds = [n for n in c.stage_order if stages[n].kind == "grpo"]
    if kinds:
      out.append(pytest.param(path, kinds[0], id=os.path.basename(path)[:-3]))
  return out


def _setup(path, fields=None):
  c = launch.parse_config(["launch", "--config", path])
  if c.init_from:  # a real pretrained model (SmolLM2: converted on first use)
    cfg, params = hf.load(sources.resolve(c.init_from))
    return c, cfg.replace(**(fields or {})), params
  cfg = ModelConfig.from_config(dict(c.model.to_dict(), **(fields or {})))
  params = testing.jit(lambda r: jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x,
                                              model.init(cfg, r)))(jax.random.key(0))
  return c, cfg, params


def _first_update_metrics(c, cfg, params, stage, score_cfg=None, temperature=None,
                          loss_temperature=None, draft=None):
  s = run_config.stage_configs(c)[stage]
  if draft is not None:
    s = dataclasses.replace(s, draft=draft)
  if temperature is not None:
    s = dataclasses.replace(s, temperature=temperature)
  if loss_temperature is None:
    loss_temperature = s.temperature
  tok = get_tokenizer(sources.resolve(c.data.tokenizer))
  records = recipe.make_splits(c)["rl"][:PROMPTS]
  pcfg = sampler.policy_config(cfg)
  scored = engine.rollout(params, pcfg, records, tokenizer=tok, mesh=make_mesh({"data": 1},
                                                                               jax.devices()[:1]),
                          template=s.template or c.data.template,
                          sampling=engine.Sampling(max_new_tokens=MAX_NEW,
                                                   temperature=s.temperature, top_p=s.top_p,
                                                   record_routing=s.routing_replay,
                                                   draft=s.draft),
                          rng=jax.random.key(1), repeats=s.group_size,
                          reward_weights=s.reward_weights)
  adv, _ = grpo.group_advantages(scored.rewards, s.group_size, s.advantage_scale)
  batch = jax.tree.map(np.asarray, grpo_stage.grpo_batch(
      scored.rollout, adv, mask_truncated=s.mask_truncated, routing=s.routing_replay,
      share_prompt=s.group_size if s.share_prompt else 0))
  assert (batch.prefix_tokens is not None) == s.share_prompt
  loss = grpo.grpo_loss(score_cfg or pcfg, loss_type=s.loss_type, policy_loss=s.policy_loss,
                        eps_low=s.eps_low, eps_high=s.eps_high, beta=s.beta, budget=MAX_NEW,
                        temperature=loss_temperature)
  _, metrics = testing.jit(loss)(params, batch, None, params if s.beta > 0 else None)
  assert float(metrics["tokens"]) > PROMPTS * s.group_size  # completions were scored
  return {k: float(v) for k, v in metrics.items() if not k.startswith("_")}


@pytest.mark.parametrize("path, stage", _grpo_configs())
def test_first_update_is_exactly_on_policy(path, stage):
  """|ratio - 1| < 3e-5 for the tiny models. A decode step and a full forward multiply matrices
  of different shapes, so XLA sums in different orders; how far the float32 roundings carry
  depends on the sampled tokens. The tiny Qwen3 and Qwen3-MoE policies (GQA attention, weights
  x4) reach 1.3e-5 to 2e-5 (the MoE adds nothing: its dense all-experts reference path gives the
  same figure); r1_zero_tiny's MLA policy reached 1.4e-5 once the arithmetic splits were dealt
  from shuffled problem lists (other prompts), after staying under 1e-5 before. The 30-layer
  SmolLM2 gets up to 3e-5 (measured 2.7e-5), its layers adding those roundings up; it is held to
  1e-4. Its config runs the update with each group's prompt shared (`share_prompt`), so that
  path is checked on-policy here too. An off-policy bug is far larger (a capacity mismatch moves log-probs by more than 1e-3:
  the test below)."""
  c, cfg, params = _setup(path)
  m = _first_update_metrics(c, cfg, params, stage)
  tol = 1e-4 if cfg.num_hidden_layers > 8 else 3e-5
  assert abs(m["mismatch_ratio_max"] - 1) < tol and abs(m["mismatch_ratio_min"] - 1) < tol, m
  assert abs(m["ratio_max"] - 1) < tol and abs(m["ratio_min"] - 1) < tol, m
  assert m["logp_mismatch_max"] < tol, m
  assert m["mismatch_clip_frac"] == 0 and m["clip_frac"] == 0, m


def test_speculative_rollouts_are_exactly_on_policy():
  """Rollouts drafted by the MTP module (`draft="mtp"`) return the policy's own log-probs of
  the tokens it emits: the first update's ratio is 1 to float noise, as without the draft."""
  path = os.path.join(ROOT, "configs", "r1_tiny.py")
  c, cfg, params = _setup(path)
  m = _first_update_metrics(c, cfg, params, "grpo", draft="mtp")
  assert abs(m["ratio_max"] - 1) < 3e-5 and abs(m["ratio_min"] - 1) < 3e-5, m
  assert m["logp_mismatch_max"] < 3e-5 and m["clip_frac"] == 0, m


def test_tempered_rollouts_are_on_policy_for_the_tempered_loss():
  """Rollouts at temperature 1.5 return log-probs of softmax(logits / 1.5), and the loss at the
  stage's temperature scores that same distribution: ratio 1 to float noise. The negative
  control scores them at temperature 1 (what the loss did before it took the temperature): the
  log-probs move by far more than noise."""
  path = os.path.join(ROOT, "configs", "r1_tiny.py")
  c, cfg, params = _setup(path)
  m = _first_update_metrics(c, cfg, params, "grpo", temperature=1.5)
  assert abs(m["ratio_max"] - 1) < 3e-5 and abs(m["ratio_min"] - 1) < 3e-5, m
  assert m["logp_mismatch_max"] < 3e-5 and m["clip_frac"] == 0, m
  off = _first_update_metrics(c, cfg, params, "grpo", temperature=1.5, loss_temperature=1.0)
  assert off["logp_mismatch_max"] > 1e-2, off


def test_scoring_with_the_capacity_limited_training_config_is_off_policy():
  """The negative control: a capacity-buffer training config (what r1_tiny trained with before:
  capacity_factor=2.0; 0.5 here, so that a small batch drops too) drops expert assignments in a
  full-sequence forward; scored with it, the sampled tokens' log-probs move (the fault the
  shared policy config removes)."""
  path = os.path.join(ROOT, "configs", "r1_tiny.py")
  c, cfg, params = _setup(path, {"moe_impl": "capacity", "capacity_factor": 0.5})
  assert cfg.capacity_factor == 0.5
  m = _first_update_metrics(c, cfg, params, "grpo", score_cfg=cfg)
  assert m["moe_drop_frac"] > 0 and m["logp_mismatch_max"] > 1e-3, m


def test_fp8_policy_samples_and_scores_alike(monkeypatch):
  """With model.fp8 the update's MLA kv_b and o projections are FP8 GEMMs; the sampler rounds
  the cached latent and kv_b as that GEMM does and runs o through it. Exact equality is out of
  reach: a float-noise difference upstream (different matmul shapes in a decode step and a
  full forward) occasionally lands a value on the other side of an e4m3 rounding step, which
  moves that token's log-prob (measured: mean |dlogp| 8e-4, max 0.06 over 233 tokens, none
  clipped). Without the sampler's rounding the mean is 0.18 and 23 % of tokens fall outside
  the clip range. The importance corrections (is_correction) exist for this residue."""
  path = os.path.join(ROOT, "configs", "grpo_tiny.py")
  c, cfg, params = _setup(path, {"fp8": True, "num_hidden_layers": 2})
  m = _first_update_metrics(c, cfg, params, "grpo")
  assert m["logp_mismatch_mean"] < 3e-3 and m["mismatch_clip_frac"] <= 0.01, m
  # the compiled-GPU fallback (XLA on dequantized operands): it once cast them to bf16 in this
  # float32 model, so the first H200 run measured a mean |dlogp| of 0.22 (0.11 here)
  from pallas_kernels import _common
  monkeypatch.setattr(_common, "use_pallas", lambda interpret: False)
  jax.clear_caches()
  m = _first_update_metrics(c, cfg, params, "grpo")
  assert m["logp_mismatch_mean"] < 3e-3 and m["mismatch_clip_frac"] <= 0.01, m
  monkeypatch.undo()
  from r1jax.model import mla
  monkeypatch.setattr(mla, "_fp8_round_activations", lambda x: x)
  monkeypatch.setattr(mla, "_fp8_round_weights", lambda w: w)
  jax.clear_caches()
  m = _first_update_metrics(c, cfg, params, "grpo")
  assert m["logp_mismatch_mean"] > 0.03 and m["mismatch_clip_frac"] > 0.05, m
  jax.clear_caches()


def _hand_rollout(rng, vocab_size, B, P, N, *, min_prompt, lengths):
  """A sampler.Rollout of random tokens: left-padded prompts of min_prompt..P tokens, then
  completions whose lengths are drawn from [lengths[0], lengths[1]), padded with 0."""
  prompt_lengths = rng.integers(min_prompt, P + 1, size=B).astype(np.int32)
  lengths = rng.integers(*lengths, size=B).astype(np.int32)
  toks = rng.integers(3, vocab_size, size=(B, P + N)).astype(np.int32)
  mask = np.arange(N)[None, :] < lengths[:, None]
  toks[:, P:] = np.where(mask, toks[:, P:], 0)
  toks[:, :P] = np.where(np.arange(P)[None, :] >= P - prompt_lengths[:, None], toks[:, :P], 0)
  logp = np.where(mask, -rng.uniform(0.5, 3.0, size=(B, N)), 0).astype(np.float32)
  return sampler.Rollout(tokens=toks, completion=toks[:, P:], logprobs=logp,
                         completion_mask=mask, lengths=lengths,
                         truncated=np.zeros(B, bool), prompt_lengths=prompt_lengths)


def test_length_bucket_cuts_padding_and_keeps_the_loss():
  """`length_bucket` ends the update's batch after the longest completion (rounded up): the cut
  columns are padding in every row and the model is causal, so the loss and its gradient are
  those of the full-width batch. Checked on r1_tiny's MoE policy with a hand-built rollout whose
  completions stop at 3-9 of 16 tokens; the negative control shows the comparison can fail."""
  path = os.path.join(ROOT, "configs", "r1_tiny.py")
  c, cfg, params = _setup(path)
  pcfg = sampler.policy_config(cfg)
  rng = np.random.default_rng(0)
  B, P, N = 8, 16, 16
  rollout = _hand_rollout(rng, cfg.vocab_size, B, P, N, min_prompt=4, lengths=(3, 10))
  adv = rng.normal(size=B).astype(np.float32)
  full = grpo_stage.grpo_batch(rollout, adv, mask_truncated=False)
  cut = grpo_stage.grpo_batch(rollout, adv, mask_truncated=False, length_bucket=4)
  assert full.tokens.shape == (B, P + N - 1)
  assert cut.tokens.shape == (B, P + 12 - 1)  # longest completion 9 -> 12
  np.testing.assert_array_equal(cut.loss_mask.sum(), full.loss_mask.sum())
  loss = grpo.grpo_loss(pcfg, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.0, budget=N)
  grad = testing.jit(jax.value_and_grad(lambda p, b: loss(p, b, None, None)[0]))
  (l_full, g_full), (l_cut, g_cut) = grad(params, full), grad(params, cut)
  np.testing.assert_allclose(float(l_cut), float(l_full), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g_cut), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  # negative control: cutting one completion token too many changes the loss
  short = jax.tree.map(lambda x: x[:, :-4] if getattr(x, "ndim", 0) == 2 else x, cut)
  assert abs(float(grad(params, short)[0]) - float(l_full)) > 1e-4


def test_context_parallel_update_equals_the_single_device_update():
  """With a `context` mesh axis the stage pads the update's columns to a multiple of it
  (twice that in the zigzag order, `pad_columns`: 31 -> 32 here); the padding changes neither the loss, its metrics nor its
  gradient. On a data 2 x context 4 mesh (each device 8 of each row's 32 positions), r1_tiny's
  MLA + MoE policy then gives the single-device update. Unpadded, 31 columns do not split over
  4 devices, so each row would run whole on every context device."""
  c, cfg, params = _setup(os.path.join(ROOT, "configs", "r1_tiny.py"))
  pcfg = sampler.policy_config(cfg)
  rng = np.random.default_rng(4)
  B, P, N = 8, 16, 16
  rollout = _hand_rollout(rng, cfg.vocab_size, B, P, N, min_prompt=4, lengths=(3, N + 1))
  adv = rng.normal(size=B).astype(np.float32)
  batch = grpo_stage.grpo_batch(rollout, adv, mask_truncated=False)
  mesh = parallel.make_mesh(dict(data=2, context=4))
  padded = grpo_stage.pad_columns(batch, parallel.position_multiple(mesh, pcfg.context_order))
  assert batch.tokens.shape == (B, 31) and padded.tokens.shape == (B, 32)
  assert grpo_stage.pad_columns(padded, 4) is padded and grpo_stage.pad_columns(batch, 1) is batch
  loss = grpo.grpo_loss(pcfg, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.0, budget=N)
  grad = testing.jit(jax.value_and_grad(lambda p, b: loss(p, b, None, None), has_aux=True))
  (l_ref, m_ref), g_ref = grad(params, batch)
  for got_batch, p in ((padded, params), (parallel.shard_batch(padded, mesh),
                                          parallel.shard_params(params, pcfg, mesh))):
    with jax.set_mesh(mesh) if got_batch is not padded else contextlib.nullcontext():
      (l_got, m_got), g_got = grad(p, got_batch)
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=1e-5, atol=1e-7)
    for k in ("entropy", "tokens", "logp_mismatch_mean", "ratio_mean"):
      np.testing.assert_allclose(float(m_got[k]), float(m_ref[k]), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert parallel.shard_batch(padded, mesh).tokens.sharding.spec == jax.sharding.PartitionSpec(
      "data", "context")


def test_update_groups_keeps_every_signal_group_in_power_of_two_batches():
  """`drop_zero_var` keeps each group with a reward spread, fills up with flat groups to a
  power-of-two count (at least `min_groups`, at most every group), and keeps group order."""
  flat = np.ones(16, bool)
  np.testing.assert_array_equal(grpo_stage.update_groups(flat), [0, 1])  # none: 2 flat groups
  z = flat.copy()
  z[[5]] = False
  np.testing.assert_array_equal(grpo_stage.update_groups(z), [0, 5])
  z[[3, 9]] = False
  np.testing.assert_array_equal(grpo_stage.update_groups(z), [0, 3, 5, 9])
  z[[11, 12]] = False  # 5 signal groups -> 8
  kept = grpo_stage.update_groups(z)
  assert len(kept) == 8 and set(np.flatnonzero(~z)) <= set(kept)
  assert len(grpo_stage.update_groups(z, min_groups=16)) == 16
  assert len(grpo_stage.update_groups(np.zeros(6, bool))) == 6  # capped at every group


def test_drop_zero_var_update_has_the_full_batch_policy_gradient():
  """Flat groups have zero advantage, so (beta = 0) the update on the kept groups has the full
  batch's policy gradient, scaled by rows / kept rows under the "grpo" row mean. Checked on
  r1_tiny's MoE policy with a hand-built rollout of 4 groups, 2 of them flat; the negative
  control drops a group with a reward spread and the gradient changes."""
  path = os.path.join(ROOT, "configs", "r1_tiny.py")
  c, cfg, params = _setup(path)
  pcfg = sampler.policy_config(cfg)
  rng = np.random.default_rng(1)
  G, groups, P, N = 4, 4, 8, 8
  B = G * groups
  rollout = _hand_rollout(rng, cfg.vocab_size, B, P, N, min_prompt=3, lengths=(2, N + 1))
  rewards = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1], np.float32)
  adv, zero_var = grpo.group_advantages(rewards, G)
  np.testing.assert_array_equal(zero_var, [True, False, True, False])
  kept = grpo_stage.update_groups(zero_var)
  np.testing.assert_array_equal(kept, [1, 3])
  loss = grpo.grpo_loss(pcfg, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.0, budget=N)
  grad = testing.jit(jax.grad(lambda p, b: loss(p, b, None, None)[0]))

  def grad_of(groups_kept):
    sub = grpo_stage.take_groups(rollout, groups_kept, G)
    sub_adv = adv.reshape(-1, G)[groups_kept].reshape(-1)
    return grad(params, grpo_stage.grpo_batch(sub, sub_adv, mask_truncated=False))

  g_full = grad(params, grpo_stage.grpo_batch(rollout, adv, mask_truncated=False))
  g_kept = grad_of(kept)
  scale = len(kept) / groups
  for a, b in zip(jax.tree.leaves(g_kept), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a) * scale, np.asarray(b), rtol=1e-3,
                               atol=1e-5 * float(np.max(np.abs(np.asarray(b)))))
  # negative control: leaving out a group with a reward spread changes the gradient
  g_wrong = grad_of(np.array([0, 1]))
  diff = max(float(np.max(np.abs(np.asarray(a) * scale - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(g_wrong), jax.tree.leaves(g_full)))
  assert diff > 1e-5


def _grouped_rollout(rng, vocab_size, groups, G, P, N):
  """`_hand_rollout` of `groups` prompts, each repeated for its G rows (a GRPO group)."""
  r = _hand_rollout(rng, vocab_size, groups * G, P, N, min_prompt=3, lengths=(2, N + 1))
  first = np.repeat(np.arange(groups) * G, G)
  toks = np.concatenate([r.tokens[first, :P], r.tokens[:, P:]], axis=1)
  return dataclasses.replace(r, tokens=toks, prompt_lengths=r.prompt_lengths[first])


@pytest.mark.parametrize("family", ["deepseek_moe", "qwen3", "qwen3_scanned"])
def test_shared_prompt_update_equals_the_whole_row_update(family):
  """`share_prompt` runs each group's prompt once and its G completions over the shared keys
  and values: the loss, its metrics and its gradient equal the whole-row update's, on r1_tiny's
  MLA + MoE policy (prompt tokens routed once) and on a tiny Qwen3 (GQA with q/k norms; its
  layers as a Python loop, as the tiny configs run them, and under lax.scan, as SmolLM2 and the
  full-size configs do), with groups of different left padding and completion lengths. The
  negative control gives the rows of one group another group's prompt: the check fails."""
  if family == "deepseek_moe":
    c, cfg, params = _setup(os.path.join(ROOT, "configs", "r1_tiny.py"))
    cfg = sampler.policy_config(cfg)
  else:
    cfg = ModelConfig.from_config(run_config.tiny_student_fields(
        model_type="qwen3", head_dim=32, tie_word_embeddings=False,
        scan_layers=family == "qwen3_scanned"))
    params = testing.random_params(cfg, seed=3, std=0.3)
  rng = np.random.default_rng(2)
  G, groups, P, N = 4, 3, 10, 8
  rollout = _grouped_rollout(rng, cfg.vocab_size, groups, G, P, N)
  adv = rng.normal(size=groups * G).astype(np.float32)
  whole = grpo_stage.grpo_batch(rollout, adv, mask_truncated=False)
  shared = grpo_stage.grpo_batch(rollout, adv, mask_truncated=False, share_prompt=G)
  assert shared.prefix_tokens.shape == (groups, P - 1) and shared.tokens.shape == (G * groups, N)
  np.testing.assert_array_equal(shared.loss_mask.sum(), whole.loss_mask.sum())
  loss = grpo.grpo_loss(cfg, loss_type="dr_grpo", eps_low=0.2, eps_high=0.28, beta=0.0,
                        budget=N, temperature=0.8)
  grad = testing.jit(jax.value_and_grad(lambda p, b: loss(p, b, None, None), has_aux=True))
  (l_whole, m_whole), g_whole = grad(params, whole)
  (l_shared, m_shared), g_shared = grad(params, shared)
  np.testing.assert_allclose(float(l_shared), float(l_whole), rtol=1e-5, atol=1e-7)
  for k in ("entropy", "tokens", "logp_mismatch_mean", "ratio_mean"):
    np.testing.assert_allclose(float(m_shared[k]), float(m_whole[k]), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6 * max(1.0, float(np.max(np.abs(np.asarray(b))))))
  if cfg.is_moe:  # every real token routed: the shared prompt once, each row's own tokens
    counts = np.asarray(m_shared["_counts"]["moe_bias"] if "moe_bias" in m_shared["_counts"]
                        else next(iter(m_shared["_counts"].values())))
    real = int(shared.prefix_valid.sum() + shared.segment_ids.sum())
    assert counts.sum() == real * cfg.num_experts_per_tok * cfg.num_moe_layers
  # negative control: group 0's rows scored under group 1's prompt
  wrong = shared.replace(prefix_tokens=shared.prefix_tokens[[1, 1, 2]],
                         prefix_valid=shared.prefix_valid[[1, 1, 2]],
                         prefix_positions=shared.prefix_positions[[1, 1, 2]])
  assert abs(float(grad(params, wrong)[0][0]) - float(l_whole)) > 1e-5


def test_shared_prompt_batch_rejects_groups_with_different_prompts():
  rng = np.random.default_rng(3)
  rollout = _hand_rollout(rng, 64, 8, 6, 4, min_prompt=6, lengths=(1, 5))
  with pytest.raises(AssertionError, match="differ in prompt"):
    grpo_stage.grpo_batch(rollout, np.zeros(8, np.float32), mask_truncated=False,
                          share_prompt=4)
