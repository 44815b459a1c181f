"""Online training of the MTP draft during GRPO (`draft_weight`, `losses.grpo.draft_loss`).

The draft may learn, the policy may not notice: with draft_weight > 0 every weight outside the
MTP module gets the gradient and the update of the policy loss alone, the MTP module gets
draft_weight x the gradient of its cross-entropy on the rollout's completion tokens at the
sampling temperature, and training it on the policy's own rollouts raises the share of drafts
the policy accepts.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r1jax import model, train
from r1jax.model.config import ModelConfig
from r1jax.rollout import sampler
from r1jax.stages import grpo as grpo_stage
from r1jax.train.losses import core, grpo
from r1jax.train import state as state_lib
import testing

ROOT = os.path.join(os.path.dirname(__file__), "..")
T_SAMPLE, N_NEW, G = 0.7, 12, 4


def _is_mtp(path) -> bool:
  return any(getattr(k, "key", None) == "mtp" for k in path)


def _split(tree):
  """(leaves outside the MTP module, leaves inside it), each a list in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ([x for p, x in flat if not _is_mtp(p)], [x for p, x in flat if _is_mtp(p)])


@pytest.fixture(scope="module")
def setup():
  """The tiny MoE (2 layers, MTP depth 1), weights x3 so its distributions are peaked, and one
  speculative rollout batch of 3 prompts x G samples with its advantages (random rewards)."""
  spec = importlib.util.spec_from_file_location("tiny_moe",
                                                os.path.join(ROOT, "configs", "tiny_moe.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = ModelConfig.from_config(mod.get_config().model).replace(num_hidden_layers=2)
  cfg = sampler.policy_config(cfg)
  params = testing.jit(lambda r: jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x,
                                              model.init(cfg, r)))(jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [p for n in (3, 7, 10) for p in [rng.integers(2, 128, n).tolist()] * G]
  out = sampler.generate(params, cfg, prompts, max_new_tokens=N_NEW, rng=jax.random.key(1),
                         temperature=T_SAMPLE, eos_id=cfg.eos_token_id, draft="mtp",
                         compiler_options=testing.FAST_COMPILE)
  adv, _ = grpo.group_advantages(rng.normal(size=len(prompts)), G)
  batch = jax.tree.map(np.asarray, grpo_stage.grpo_batch(out, adv, mask_truncated=False))
  return cfg, params, batch, prompts


def _loss(cfg, draft_weight):
  return grpo.grpo_loss(cfg, eps_low=0.2, eps_high=0.2, beta=0.0, budget=N_NEW,
                        temperature=T_SAMPLE, draft_weight=draft_weight)


def test_draft_gradient_is_the_mtp_cross_entropy_and_leaves_the_policy_alone(setup):
  """Outside the MTP module the gradient with draft_weight 0.3 is the policy loss's (to float
  rounding: the two programs fuse differently, 8e-8 apart where gradients are about 3e-2);
  inside it, 0.3 x the gradient of the MTP cross-entropy at the sampling temperature, formed
  here from `forward_with_aux(mtp=True)`'s logits. Negative control: that cross-entropy without
  `mtp_detach` sends a gradient into the trunk, which the detached loss must not."""
  cfg, params, batch, _ = setup
  grad = lambda w: testing.jit(jax.grad(lambda p: _loss(cfg, w)(p, batch, None, None)[0]))(
      params)
  plain, drafted = grad(0.0), grad(0.3)
  outside_plain, inside_plain = _split(plain)
  outside, inside = _split(drafted)
  for a, b in zip(outside_plain, outside):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(float(jnp.abs(x).max()) == 0 for x in inside_plain)

  def mtp_ce(p, detach):
    _, aux = model.forward_with_aux(p, batch.tokens, cfg, segment_ids=batch.segment_ids,
                                    token_mask=batch.segment_ids > 0, positions=batch.positions,
                                    mtp=True, mtp_detach=detach)
    return core.mtp_loss(aux["mtp_logits"] / T_SAMPLE, batch.targets, batch.loss_mask,
                         batch.segment_ids)

  want = testing.jit(jax.grad(lambda p: 0.3 * mtp_ce(p, False)))(params)
  want_outside, want_inside = _split(want)
  assert max(float(jnp.abs(x).max()) for x in inside) > 1e-4
  for a, b in zip(inside, want_inside):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the control: undetached, the MTP loss moves the trunk (and the shared embedding and head)
  assert max(float(jnp.abs(x).max()) for x in want_outside) > 1e-4

  # the chunked head (cfg.logits_chunk) gives the same draft loss and MTP gradient
  ccfg = cfg.replace(logits_chunk=4)
  metrics = testing.jit(lambda p: _loss(cfg, 0.3)(p, batch, None, None)[1])(params)
  cmetrics = testing.jit(lambda p: _loss(ccfg, 0.3)(p, batch, None, None)[1])(params)
  np.testing.assert_allclose(float(cmetrics["draft_loss"]), float(metrics["draft_loss"]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["draft_loss"]), float(mtp_ce(params, True)), rtol=1e-5)
  cinside = _split(testing.jit(jax.grad(lambda p: _loss(ccfg, 0.3)(p, batch, None, None)[0]))(
      params))[1]
  for a, b in zip(cinside, inside):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _step(cfg, draft_weight, clip_apart_key, lr=1e-2, clip_norm=1e-3):
  optim = ml_collections.ConfigDict(dict(lr=lr, warmup_steps=0, schedule="constant",
                                         clip_norm=clip_norm, weight_decay=0.0))
  tx, lr_of = train.make_optimizer(optim, 10, clip_apart_key=clip_apart_key)
  step = train.make_step(_loss(cfg, draft_weight), tx, lr_of, donate=False,
                         jit=False)
  return tx, testing.jit(step)


def test_the_draft_update_leaves_the_policy_update_alone(setup):
  """One optimizer step with a clip norm of 1e-6: it binds, and the clipped gradients fall below
  Adam's eps, so the update is proportional to the clip's scale. With draft training (the MTP
  gradient clipped apart) every weight outside the MTP module moves as without it (to float
  rounding), and the MTP module moves; without it the MTP module stays put. Negative control:
  one global clip over both lets the MTP gradient shrink the policy's update."""
  cfg, params, batch, _ = setup

  def after(draft_weight, clip_apart_key):
    tx, step = _step(cfg, draft_weight, clip_apart_key, clip_norm=1e-6)
    state = state_lib.create(params, tx, seed=0)
    new, metrics = step(state, batch)
    assert float(metrics["grad_norm"]) > 1e-3  # the clip binds
    return new.params, metrics

  plain, _ = after(0.0, "")
  drafted, metrics = after(0.3, "mtp")
  assert float(metrics["draft_loss"]) > 0
  (outside_plain, inside_plain), (outside, inside) = _split(plain), _split(drafted)
  gap = lambda xs, ys: max(float(jnp.abs(a - b).max()) for a, b in zip(xs, ys))
  assert gap(outside_plain, outside) < 1e-7  # measured 1.5e-8: float rounding
  _, inside_start = _split(state_lib.split_router_bias(params)[0])
  for a, b in zip(inside_plain, inside_start):
    np.testing.assert_array_equal(a, b)  # no draft training: the MTP module stays put
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(inside, inside_start)) > 1e-4
  # the control
  shared, _ = after(0.3, "")
  assert gap(_split(shared)[0], outside_plain) > 1e-5  # measured 8e-5


def test_training_the_draft_on_rollouts_raises_its_acceptance(setup):
  """The MTP module trained on the policy's own rollouts (zero advantages: the policy stays put,
  only the draft learns) drafts tokens the policy accepts more often: measured on rollouts of
  other prompts before and after 25 steps at lr 1e-2."""
  cfg, params, batch, prompts = setup
  rng = np.random.default_rng(5)
  held_out = [p for n in (4, 8, 11, 6) for p in [rng.integers(2, 128, n).tolist()] * G]

  def accept_rate(p, key):
    out = sampler.generate(p, cfg, held_out, max_new_tokens=N_NEW, rng=key, temperature=T_SAMPLE,
                           eos_id=None, draft="mtp", compiler_options=testing.FAST_COMPILE)
    return out.draft_accepted / out.draft_proposed

  tx, step = _step(cfg, 1.0, "mtp", lr=1e-2, clip_norm=1.0)
  state = state_lib.create(params, tx, seed=0)
  before = np.mean([accept_rate(params, jax.random.key(k)) for k in (10, 11)])
  for i in range(25):
    out = sampler.generate(train.full_params(state), cfg, prompts, max_new_tokens=N_NEW,
                           rng=jax.random.key(100 + i), temperature=T_SAMPLE,
                           eos_id=cfg.eos_token_id, draft="mtp",
                           compiler_options=testing.FAST_COMPILE)
    b = grpo_stage.grpo_batch(out, np.zeros(len(prompts), np.float32), mask_truncated=False)
    state, metrics = step(state, jax.tree.map(np.asarray, b))
    if i == 0:
      first = float(metrics["draft_loss"])
  trained = train.full_params(state)
  outside, _ = _split(state_lib.split_router_bias(trained)[0])
  for a, b in zip(outside, _split(state_lib.split_router_bias(params)[0])[0]):
    np.testing.assert_array_equal(a, b)  # the policy did not move
  after = np.mean([accept_rate(trained, jax.random.key(k)) for k in (10, 11)])
  assert float(metrics["draft_loss"]) < first
  assert after > before + 0.2, (before, after)  # measured 0.16 -> 0.51


def test_stage_config_refuses_draft_training_it_cannot_do():
  """share_prompt (the MTP modules run on whole rows) and a model without an MTP module."""
  from r1jax import run_config
  from r1jax.errors import ConfigError
  c = run_config.from_file(os.path.join(ROOT, "tests", "reliability", "r1_tiny_shrunk.py"))
  assert c.stages.grpo.draft_weight > 0
  run_config.validate(c)
  c.stages.grpo.share_prompt = True
  with pytest.raises(ConfigError, match="stages.grpo.draft_weight=0.1 cannot be > 0 with "
                                        "share_prompt"):
    run_config.validate(c)
  c.stages.grpo.update(share_prompt=False, draft="")
  c.model.num_nextn_predict_layers = 0
  with pytest.raises(ConfigError, match="stages.grpo.draft_weight=0.1 needs a model with an MTP"):
    run_config.validate(c)
