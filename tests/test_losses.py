"""Losses against values worked out by hand (numpy formulas written out here, or literal numbers),
never by calling the code under test: masked CE, MTP shifting, distillation divergences, MoE
balance statistic and bias update, GRPO advantages / clipping / KL / aggregation, and the generic
step (gradient accumulation, non-finite skip, bias update through the step)."""

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import model, parallel, run_config, train
from r1jax.model.config import ModelConfig
from r1jax.model import layers, moe
from r1jax.stages import common
from r1jax.train import losses
from r1jax.train.losses import grpo
from r1jax.train.losses import supervised as objectives
from r1jax.train import state as state_lib

TINY_MOE = ModelConfig.from_config(run_config.tiny_moe_fields())


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def fake_forward(monkeypatch, module, aux=None):
  """Make `module`'s model forward return the params themselves as logits, so a loss plug-in
  can be checked on logits we choose (and differentiated with respect to them)."""
  def forward_with_aux(params, tokens, cfg, **kw):
    del tokens, cfg, kw
    return params, dict(aux or {})
  monkeypatch.setattr(module.model, "forward_with_aux", forward_with_aux)


# ----------------------------------------------------------------------------- cross-entropy

def test_masked_cross_entropy_ignores_prompt_and_padding():
  # one row: positions 0, 1 are prompt, 2, 3 completion, 4 padding
  logits = np.array([[[9.0, -3.0, 1.0], [0.0, 5.0, 0.0],    # masked: any values
                      [1.0, 2.0, 3.0], [0.0, 0.0, 0.0],
                      [-7.0, 7.0, 0.0]]], np.float32)
  targets = np.array([[1, 2, 2, 0, 0]], np.int32)
  mask = np.array([[0, 0, 1, 1, 0]], np.float32)
  # position 2: -log softmax([1,2,3])[2] = log(e + e^2 + e^3) - 3; position 3: log 3
  expected = (math.log(math.e + math.e ** 2 + math.e ** 3) - 3 + math.log(3)) / 2
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  assert abs(expected - 0.75311) < 1e-4  # (0.40761 + 1.09861) / 2, worked out on paper
  # changing a masked position's logits does not change the loss
  logits2 = logits.copy()
  logits2[0, 0] = [0.0, 100.0, -100.0]
  got2 = losses.cross_entropy(jnp.asarray(logits2), jnp.asarray(targets), jnp.asarray(mask))
  assert float(got2) == pytest.approx(float(got), abs=1e-6)


def test_masked_cross_entropy_all_masked_is_zero_not_nan():
  logits = jnp.zeros((1, 3, 4))
  got = losses.cross_entropy(logits, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))
  assert float(got) == 0.0


# ----------------------------------------------------------------------------- MTP

def test_mtp_targets_shift_and_stop_at_segment_boundaries():
  # two packed examples (segments 1 and 2) then padding; position 0's target is a prompt token
  targets = np.array([[10, 11, 12, 13, 14, 15, 0]], np.int32)
  segment = np.array([[1, 1, 1, 2, 2, 2, 0]], np.int32)
  mask = np.array([[0, 1, 1, 0, 1, 1, 0]], np.float32)
  t1, m1 = losses.mtp_targets(jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(segment), 1)
  # depth 1: position i predicts targets[i + 1]; counted only if targets[i + 1] is in the same
  # segment and both positions count in the main loss.
  #   i=0: own target is prompt -> 0;  i=1: 12 in seg 1 -> 1;  i=2: 13 is in seg 2 -> 0
  #   i=3: own target is prompt -> 0;  i=4: 15 in seg 2 -> 1;  i=5: next is padding -> 0
  np.testing.assert_array_equal(np.asarray(t1), [[11, 12, 13, 14, 15, 0, 0]])
  np.testing.assert_array_equal(np.asarray(m1), [[0, 1, 0, 0, 1, 0, 0]])
  t2, m2 = losses.mtp_targets(jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(segment), 2)
  np.testing.assert_array_equal(np.asarray(t2), [[12, 13, 14, 15, 0, 0, 0]])
  #   i=1: targets[3]=13 is in seg 2 -> 0; i=3: own target prompt -> 0; i=4: targets[6] pad -> 0
  np.testing.assert_array_equal(np.asarray(m2), [[0, 0, 0, 0, 0, 0, 0]])


def test_mtp_loss_is_mean_over_depths_of_shifted_masked_ce():
  rng = np.random.default_rng(0)
  B, T, V, D = 2, 6, 5, 2
  logits = rng.standard_normal((D, B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  segment = np.array([[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 0]], np.int32)
  mask = np.array([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], np.float32)
  per_depth = []
  for k in (1, 2):
    num = den = 0.0
    for b in range(B):
      for i in range(T - k):
        if mask[b, i] and mask[b, i + k] and segment[b, i + k] == segment[b, i]:
          num -= np_log_softmax(logits[k - 1, b, i])[targets[b, i + k]]
          den += 1
    per_depth.append(num / den)
  got = losses.mtp_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                        jnp.asarray(segment))
  np.testing.assert_allclose(float(got), np.mean(per_depth), rtol=1e-5)


def test_sft_loss_composes_ce_mtp_and_balance(monkeypatch):
  """loss = CE + mtp_weight * MTP CE + alpha * balance; metrics expose each part."""
  rng = np.random.default_rng(1)
  B, T, V = 1, 4, 6
  logits = jnp.asarray(rng.standard_normal((B, T, V)), jnp.float32)
  mtp_logits = jnp.asarray(rng.standard_normal((1, B, T, V)), jnp.float32)
  aux = {"mtp_logits": mtp_logits, "expert_counts": jnp.ones((3, 16)), "dropped": 2.0,
         "balance": jnp.float32(1.25), "mtp_expert_counts": jnp.ones((1, 16)),
         "moe_rounds": 5.0}
  fake_forward(monkeypatch, objectives, aux)
  batch = {"tokens": jnp.zeros((B, T), jnp.int32), "targets": jnp.asarray([[1, 2, 3, 4]]),
           "loss_mask": jnp.asarray([[0.0, 1.0, 1.0, 1.0]]),
           "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.arange(T)[None]}
  loss_fn = train.sft_loss(TINY_MOE, mtp_weight=0.3, balance_alpha=0.01)
  loss, metrics = loss_fn(logits, batch, None, None)
  lp, mlp = np_log_softmax(logits[0]), np_log_softmax(mtp_logits[0, 0])
  ce = -(lp[1, 2] + lp[2, 3] + lp[3, 4]) / 3
  mtp = -(mlp[1, 3] + mlp[2, 4]) / 2  # positions 1, 2 predict targets[2], targets[3]
  np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mtp_loss"]), mtp, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ce + 0.3 * mtp + 0.01 * 1.25, rtol=1e-5)
  # 2 dropped of B*T*k*L_moe = 1*4*2*3 = 24 assignments
  np.testing.assert_allclose(float(metrics["moe_drop_frac"]), 2 / 24, rtol=1e-6)
  assert set(metrics["_counts"]) == {objectives.MOE_BIAS, objectives.MTP_BIAS}
  # more exchange rounds only run dropless, with fast buffers, between devices
  assert "moe_exchange_rounds" not in metrics
  fast = TINY_MOE.replace(expert_dispatch="all_to_all", dropless_fast_factor=2.0)
  _, metrics = train.sft_loss(fast)(logits, batch, None, None)
  np.testing.assert_allclose(float(metrics["moe_exchange_rounds"]), 5 / 3, rtol=1e-6)  # 3 layers


# ----------------------------------------------------------------------------- distillation

def _divergence_case():
  """Token 0: teacher at T=2 is p = [1/2, 1/4, 1/4], student at T=2 is uniform q = 1/3.
  Token 1 is masked (arbitrary logits)."""
  T = 2.0
  teacher = np.array([[np.log([0.5, 0.25, 0.25]) * T, [5.0, -5.0, 0.0]]], np.float32)
  student = np.array([[[0.7, 0.7, 0.7], [-3.0, 3.0, 1.0]]], np.float32)
  mask = np.array([[1.0, 0.0]], np.float32)
  return T, teacher, student, mask


@pytest.mark.parametrize("kind, per_token", [
    # sum p log(p/q) = 1/2 log 1.5 + 1/2 log 0.75
    ("forward_kl", 0.5 * math.log(1.5) + 0.5 * math.log(0.75)),
    # sum q log(q/p) = 1/3 (log 2/3 + 2 log 4/3)
    ("reverse_kl", (math.log(2 / 3) + 2 * math.log(4 / 3)) / 3),
    # m = (p + q)/2 = [5/12, 7/24, 7/24]; 1/2 KL(p||m) + 1/2 KL(q||m)
    ("jsd", 0.5 * (0.5 * math.log(1.2) + 0.5 * math.log(6 / 7)) +
            0.5 * (math.log(0.8) / 3 + 2 / 3 * math.log(8 / 7))),
])
def test_distill_divergences_at_temperature_with_t_squared(kind, per_token):
  T, teacher, student, mask = _divergence_case()
  got = losses.distill_divergence(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask),
                                  kind, T)
  np.testing.assert_allclose(float(got), per_token * T * T, rtol=1e-5)
  assert per_token > 0


def test_distill_forward_kl_general_temperature_against_numpy():
  rng = np.random.default_rng(3)
  s, t = rng.standard_normal((2, 3, 7)), 2 * rng.standard_normal((2, 3, 7))
  mask = np.array([[1, 1, 0], [0, 1, 1]], np.float64)
  for temp in (0.5, 1.0, 3.0):
    log_p, log_q = np_log_softmax(t / temp), np_log_softmax(s / temp)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    expected = (kl * mask).sum() / mask.sum() * temp ** 2
    got = losses.distill_divergence(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                    jnp.asarray(mask, jnp.float32), "forward_kl", temp)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_distill_divergence_is_zero_when_student_equals_teacher_and_no_teacher_grad():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 3, 5)), jnp.float32)
  mask = jnp.ones((1, 3))
  for kind in ("forward_kl", "reverse_kl", "jsd"):
    assert abs(float(losses.distill_divergence(x, x, mask, kind, 2.0))) < 1e-6
    g = jax.grad(lambda t: losses.distill_divergence(x + 1.0 * jnp.arange(5.0), t, mask, kind,
                                                     2.0))(x)
    assert float(jnp.abs(g).max()) == 0.0, kind  # the teacher is frozen


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunked_logit_distillation_equals_the_whole_logits(kind):
  """With the student's logits_chunk set, distill_loss runs both heads, the divergence and the
  CE 5 positions at a time (12 positions: the last chunk padded). The loss, metrics and the
  student's gradient equal the whole-logits loss to float rounding (teacher: the tiny MoE,
  student: the tiny dense Qwen2-style model), no [B, T, V] array is formed (the control forms
  one), and the teacher gets no gradient."""
  t_cfg = TINY_MOE.replace(vocab_size=131)  # a size no other dimension has
  s_cfg = ModelConfig.from_config(run_config.tiny_student_fields(vocab_size=t_cfg.vocab_size))
  teacher = jax.jit(lambda k: model.init(t_cfg, k))(jax.random.key(1))
  student = jax.jit(lambda k: model.init(s_cfg, k))(jax.random.key(2))
  rng = np.random.default_rng(5)
  B, T, V = 2, 12, t_cfg.vocab_size
  seg = jnp.asarray([[1] * 12, [1] * 5 + [2] * 5 + [0] * 2], jnp.int32)
  batch = {"tokens": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
           "loss_mask": jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32) * (seg > 0),
           "segment_ids": seg, "positions": layers.default_positions(seg, seg)}

  def run(cfg):
    loss_fn = objectives.distill_loss(cfg, t_cfg, kind=kind, temperature=2.0, ce_weight=0.3)
    f = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(p, batch, None, t), argnums=(0, 1),
                                   has_aux=True))
    (loss, metrics), (g, g_teacher) = f(student, teacher)
    text = f.lower(student, teacher).as_text()
    return loss, metrics, g, g_teacher, text

  loss, metrics, g, g_t, whole = run(s_cfg)
  assert f"{B}x{T}x{V}xf32" in whole  # the control forms the whole logits
  c_loss, c_metrics, c_g, c_g_t, text = run(s_cfg.replace(logits_chunk=5))
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  for k in ("ce", "divergence"):
    np.testing.assert_allclose(c_metrics[k], metrics[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), c_g, g)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(c_g_t)) == 0.0  # frozen teacher
  assert f"{B}x{T}x{V}xf32" not in text and f"{B}x5x{V}xf32" in text  # [B, T, V] never formed
  assert float(loss) > 0.1 and float(metrics["divergence"]) > 0.01  # a real, non-trivial loss


# ----------------------------------------------------------------------------- MoE balance

def test_sequence_balance_statistic():
  cfg = dataclasses.replace(TINY_MOE, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                            topk_group=1)
  # sequence 0: un-normalized scores (rows sum to 2 and 1); both tokens pick experts 0 and 1
  #   P = mean_t s/sum(s) = [(.4+.1)/2, (.3+.1)/2, (.2+.4)/2, (.1+.4)/2] = [.25, .2, .3, .25]
  #   f = E/(kT) * counts = 4/4 * [2, 2, 0, 0];  sum f P = .5 + .4 = 0.9
  # sequence 1: uniform scores, every expert once: f = 1, P = 1/4 -> 1.0
  scores = np.array([[[.8, .6, .4, .2], [.1, .1, .4, .4]],
                     [[.5, .5, .5, .5], [.5, .5, .5, .5]]], np.float32)
  ids = np.array([[[0, 1], [0, 1]], [[0, 1], [2, 3]]], np.int32)
  got = moe.sequence_balance(jnp.asarray(scores), jnp.asarray(ids), cfg)
  np.testing.assert_allclose(float(got), (0.9 + 1.0) / 2, rtol=1e-6)


def test_bias_update_lowers_overloaded_and_raises_underloaded():
  counts = jnp.asarray([[5.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])  # 2 layers
  bias = jnp.asarray([[0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
  new = np.asarray(losses.bias_update(bias, counts, 0.01))
  # layer 0: mean load 2 -> expert 0 (5) goes down by gamma, the rest up; layer 1 balanced
  np.testing.assert_allclose(new, [[0.09, 0.11, 0.11, 0.11], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)


def test_expert_load_max_over_mean():
  counts = jnp.asarray([[5.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 0.0, 2.0]])
  # per layer max/mean: 5/2, 1, 3/2 -> the max over layers is 2.5
  assert float(losses.expert_load_max_over_mean(counts)) == pytest.approx(2.5)


# ----------------------------------------------------------------------------- GRPO

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # two groups of 4; the second all correct


def test_group_advantages_group_scale_and_zero_variance_mask():
  adv, zero_var = grpo.group_advantages(REWARDS, 4, "group", eps=1e-4)
  # group 0: mean 1/2, population std 1/2 -> +-0.5/0.5001; group 1: all equal -> 0
  a = 0.5 / 0.5001
  np.testing.assert_allclose(adv, [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(zero_var, [False, True])


def test_group_advantages_batch_scale():
  adv, zero_var = grpo.group_advantages(REWARDS, 4, "batch", eps=0.0)
  # centred per group, divided by the std of all 8 rewards: mean 3/4, std sqrt(3/16)
  s = math.sqrt(3 / 16)
  np.testing.assert_allclose(adv, [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(zero_var, [False, True])


def test_group_advantages_no_scale():
  adv, _ = grpo.group_advantages([3.0, 1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 4.0], 4, "none")
  np.testing.assert_allclose(adv, [1, -1, 0, 0, -1, -1, -1, 3], rtol=1e-6)
  with pytest.raises(ValueError, match="advantage scale"):
    grpo.group_advantages(REWARDS, 4, "rank")


def test_per_token_k3_kl():
  logp = jnp.log(jnp.asarray([[0.5, 0.2]]))
  ref = jnp.log(jnp.asarray([[0.25, 0.2]]))
  loss, ratio, kl = grpo.per_token_terms(logp, logp, ref, jnp.zeros(1), eps_low=0.2,
                                         eps_high=0.2, beta=0.1)
  # d = log(ref/p) = log(1/2): k3 = e^d - d - 1 = 1/2 + log 2 - 1; equal probs -> 0
  k3 = 0.5 + math.log(2) - 1
  np.testing.assert_allclose(np.asarray(kl), [[k3, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(ratio), [[1.0, 1.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(loss), [[0.1 * k3, 0.0]], atol=1e-6)  # A = 0


# 2 x 4 per-token losses and mask: row 0 has 3 completion tokens, row 1 has 2
PER_TOK = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (6 / 3 + 11 / 2) / 2),  # mean over sequences of each sequence's token mean: 3.75
    ("bnpo", 17 / 5),                # token mean over the batch: 3.4
    ("dapo", 17 / 5),
    ("dr_grpo", 17 / (2 * 4)),       # token sum / (B * budget): 2.125
])
def test_aggregation_modes(loss_type, expected):
  got = grpo.aggregate(jnp.asarray(PER_TOK), jnp.asarray(MASK), loss_type, budget=4)
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


# ratios pi/pi_old chosen per token; row 0 has A = +1, row 1 has A = -1; eps = 0.2
RATIOS = np.array([[1.5, 0.5, 1.1, 2.0], [0.7, 1.3, 0.9, 0.1]], np.float64)
CLIP_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.float32)
# -min(r A, clip(r, .8, 1.2) A):  row 0: -1.2 (clipped), -0.5, -1.1;  row 1: 0.8 (clipped),
# 1.3, 0.9; the last column is masked
PG = np.array([[-1.2, -0.5, -1.1, 0.0], [0.8, 1.3, 0.9, 0.0]])
CLIPPED = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], bool)


def _grpo_inputs(seed=0, B=2, T=4, V=5):
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  logp = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  old = jnp.asarray(logp - np.log(RATIOS), jnp.float32)
  batch = grpo.GRPOBatch(
      tokens=jnp.zeros((B, T), jnp.int32), targets=jnp.asarray(targets),
      segment_ids=jnp.ones((B, T), jnp.int32), positions=jnp.tile(jnp.arange(T), (B, 1)),
      loss_mask=jnp.asarray(CLIP_MASK),
      # mu > 1: the policy moved since sampling, old != current
      rollout_logprobs=old, old_logprobs=old, advantages=jnp.asarray([1.0, -1.0], jnp.float32))
  return jnp.asarray(logits), batch, logp


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", ((-1.2 - 0.5 - 1.1) / 3 + (0.8 + 1.3 + 0.9) / 3) / 2),
    ("bnpo", (-2.8 + 3.0) / 6),
    ("dapo", (-2.8 + 3.0) / 6),
    ("dr_grpo", (-2.8 + 3.0) / (2 * 10)),
])
def test_grpo_loss_clipping_and_clip_fractions(monkeypatch, loss_type, expected):
  fake_forward(monkeypatch, grpo)
  logits, batch, _ = _grpo_inputs()
  loss_fn = grpo.grpo_loss(TINY_MOE, loss_type=loss_type, eps_low=0.2, eps_high=0.2, beta=0.0,
                           budget=10)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logits, batch, None, None)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
  assert np.sum(PG * CLIP_MASK) == pytest.approx(0.2)  # the hand table adds up
  # one of 6 counted tokens clipped high (r=1.5, A>0), one clipped low (r=0.7, A<0); the masked
  # r=2.0 and r=0.1 do not count
  assert float(metrics["clip_frac_high"]) == pytest.approx(1 / 6)
  assert float(metrics["clip_frac_low"]) == pytest.approx(1 / 6)
  assert float(metrics["clip_frac"]) == pytest.approx(2 / 6)
  # clipped and masked tokens pass no gradient; unclipped counted ones do
  g = np.abs(np.asarray(grad)).sum(-1)
  assert np.all(g[CLIPPED] == 0) and np.all(g[CLIP_MASK == 0] == 0)
  assert np.all(g[(CLIP_MASK == 1) & ~CLIPPED] > 1e-4)


def test_grpo_loss_with_reference_kl(monkeypatch):
  fake_forward(monkeypatch, grpo)
  logits, batch, logp = _grpo_inputs(seed=1)
  ref_logits = logits + jnp.asarray(np.random.default_rng(2).standard_normal(logits.shape),
                                    jnp.float32)
  targets = np.asarray(batch.targets)
  ref_logp = np.take_along_axis(np_log_softmax(ref_logits), targets[..., None], -1)[..., 0]
  d = ref_logp - logp
  k3 = np.exp(d) - d - 1
  beta = 0.05
  loss_fn = grpo.grpo_loss(TINY_MOE, loss_type="bnpo", beta=beta)
  loss, metrics = loss_fn(logits, batch, None, ref_logits)
  n = CLIP_MASK.sum()
  np.testing.assert_allclose(float(metrics["kl"]), (k3 * CLIP_MASK).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ((PG + beta * k3) * CLIP_MASK).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["pg_loss"]), (PG * CLIP_MASK).sum() / n, rtol=1e-5)


def test_gspo_clips_the_length_normalized_sequence_ratio(monkeypatch):
  """GSPO: one ratio per sequence, s = exp(mean over its completion tokens of log(pi/pi_old)),
  clipped like PPO's; hand values from the RATIOS table. A clipped sequence passes no
  gradient; an unclipped one spreads A * s / |y| over its tokens."""
  fake_forward(monkeypatch, grpo)
  logits, batch, _ = _grpo_inputs()
  s = np.exp([np.log(RATIOS[b, :3]).mean() for b in range(2)])  # 3 counted tokens per row
  np.testing.assert_allclose(s, [0.937889, 0.935609], rtol=1e-5)
  for eps, clipped in ((0.2, [False, False]), (0.05, [False, True])):
    adv = np.array([1.0, -1.0])
    expected = -np.minimum(s * adv, np.clip(s, 1 - eps, 1 + eps) * adv).mean()
    loss_fn = grpo.grpo_loss(TINY_MOE, policy_loss="gspo", loss_type="grpo", eps_low=eps,
                             eps_high=eps)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logits, batch, None, None)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), s.mean(), rtol=1e-5)
    g = np.abs(np.asarray(grad)).sum((1, 2))
    for b in range(2):
      assert (g[b] == 0) == clipped[b], (eps, b, g)


# importance weights exp(logp_old - logp_rollout) per token; the last column is masked
IS_W = np.array([[1.0, 3.0, 0.4, 9.0], [1.5, 0.8, 1.2, 9.0]], np.float64)


@pytest.mark.parametrize("kind", ["token_tis", "seq_tis", "token_mis", "seq_mis"])
def test_importance_corrections_against_hand_values(monkeypatch, kind):
  """TIS multiplies each token's policy loss by min(w, C); MIS drops tokens (sequences) whose
  w (product of token w) falls outside [C_low, C]. C = 2, C_low = 0.5, bnpo aggregation."""
  fake_forward(monkeypatch, grpo)
  logits, batch, _ = _grpo_inputs()
  batch = batch.replace(rollout_logprobs=batch.old_logprobs - jnp.asarray(np.log(IS_W),
                                                                          jnp.float32))
  m = CLIP_MASK.astype(np.float64)
  if kind == "token_tis":
    per_tok, keep = PG * np.minimum(IS_W, 2.0), m
  elif kind == "seq_tis":
    w = np.prod(np.where(m > 0, IS_W, 1.0), 1, keepdims=True)  # 1.2 and 1.44
    per_tok, keep = PG * np.minimum(w, 2.0), m
  elif kind == "token_mis":
    per_tok, keep = PG, m * ((IS_W >= 0.5) & (IS_W <= 2.0))  # drops 3.0 and 0.4
  else:
    w = np.prod(np.where(m > 0, IS_W, 1.0), 1, keepdims=True)
    per_tok, keep = PG, m * ((w >= 0.5) & (w <= 2.0))  # both rows kept (1.2, 1.44)
  expected = (per_tok * keep).sum() / keep.sum()
  loss_fn = grpo.grpo_loss(TINY_MOE, loss_type="bnpo", is_correction=kind, is_threshold=2.0,
                           is_threshold_low=0.5)
  loss, metrics = loss_fn(logits, batch, None, None)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["is_kept_frac"]), keep.sum() / m.sum(), rtol=1e-6)
  # the mismatch metrics see the sampler-vs-trainer gap: |log w| of the counted tokens
  ratio = np.exp(np.log(RATIOS) + np.log(IS_W))  # pi_train / pi_rollout
  np.testing.assert_allclose(float(metrics["logp_mismatch_max"]),
                             np.abs(np.log(ratio))[m > 0].max(), rtol=1e-5)


# ----------------------------------------------------------------------------- generic step

def _linear_loss(params, batch, rng, frozen):
  """Mean squared error of a linear model; NaN where batch["poison"] is set."""
  del rng, frozen
  err = batch["x"] @ params["w"] + params["b"] - batch["y"]
  loss = jnp.mean(err ** 2) + jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 0.0)
  return loss, {"tokens": jnp.float32(batch["y"].size)}


def _linear_setup(seed=0, B=8):
  rng = np.random.default_rng(seed)
  params = {"w": rng.standard_normal((3, 2)).astype(np.float32),
            "b": rng.standard_normal((2,)).astype(np.float32)}
  batch = {"x": rng.standard_normal((B, 3)).astype(np.float32),
           "y": rng.standard_normal((B, 2)).astype(np.float32),
           "poison": np.zeros((B,), np.float32)}
  return params, batch


def _np_tree(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_grad_accumulation_equals_full_batch():
  params, batch = _linear_setup()
  tx = optax.sgd(0.1)  # an update proportional to the gradient (Adam's first step is ~sign)
  out = {}
  for accum in (1, 2):
    state = state_lib.create(jax.tree.map(jnp.asarray, params), tx, seed=0)
    step = train.make_step(_linear_loss, tx, accum_steps=accum)
    for _ in range(2):
      state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    out[accum] = (_np_tree(state.params), float(metrics["loss"]), float(metrics["grad_norm"]))
  (p1, l1, g1), (p2, l2, g2) = out[1], out[2]
  for k in p1:
    np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(p1[k], params[k])  # the update did something
  assert l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-6)
  # hand check of the first SGD step: w - 0.1 * d/dw mean((xw + b - y)^2)
  x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
  err = x @ params["w"] + params["b"] - y
  w1 = params["w"] - 0.1 * 2 * x.T @ err / err.size
  state = state_lib.create(jax.tree.map(jnp.asarray, params), tx, seed=0)
  state, _ = train.make_step(_linear_loss, tx, accum_steps=2)(state, jax.tree.map(jnp.asarray,
                                                                                   batch))
  np.testing.assert_allclose(np.asarray(state.params["w"]), w1, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "sft"])
def test_grad_accumulation_with_unequal_masks_equals_the_full_batch(monkeypatch, loss_type):
  """Micro-batches whose masks count different numbers of tokens: the accumulated loss and
  gradient are the full batch's (a token mean over all tokens for bnpo and SFT, a mean over
  all sequences for grpo, the budget sum for dr_grpo), not a mean of micro-batch means; the
  token count adds up."""
  B, T, V = 4, 6, 5
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((B, T, V)).astype(np.float32)
  mask = np.zeros((B, T), np.float32)
  mask[0, :1] = 1  # micro-batch 1 (rows 0, 1): 1 + 6 tokens; micro-batch 2: 3 + 2
  mask[1, :] = 1
  mask[2, 1:4] = 1
  mask[3, 4:] = 1
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  rows = np.broadcast_to(np.arange(B, dtype=np.int32)[:, None], (B, T)).copy()

  def forward_with_aux(params, tokens, cfg, **kw):  # the logits of the batch's own rows
    del cfg, kw
    return params["logits"][tokens[:, 0]], {}
  if loss_type == "sft":
    monkeypatch.setattr(objectives.model, "forward_with_aux", forward_with_aux)
    loss_fn = objectives.sft_loss(TINY_MOE)
    batch = {"tokens": rows, "targets": targets, "loss_mask": mask,
             "segment_ids": np.ones((B, T), np.int32), "positions": rows * 0}
  else:
    monkeypatch.setattr(grpo.model, "forward_with_aux", forward_with_aux)
    loss_fn = grpo.grpo_loss(TINY_MOE, loss_type=loss_type, budget=T)
    old = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0] - 0.1
    batch = grpo.GRPOBatch(tokens=rows, targets=targets, segment_ids=np.ones((B, T), np.int32),
                           positions=rows * 0, loss_mask=mask, rollout_logprobs=old,
                           old_logprobs=old, advantages=np.array([1.0, -0.5, 2.0, -1.0],
                                                                 np.float32))
  tx = optax.sgd(1.0)
  out = {}
  for accum in (1, 2):
    state = state_lib.create({"logits": jnp.asarray(logits)}, tx, seed=0)
    step = train.make_step(loss_fn, tx, accum_steps=accum)
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    out[accum] = (np.asarray(state.params["logits"]), float(metrics["loss"]),
                  float(metrics["tokens"]))
  np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-6, atol=1e-7)
  assert not np.allclose(out[1][0], logits)
  assert out[2][1] == pytest.approx(out[1][1], rel=1e-6)
  assert out[2][2] == out[1][2] == mask.sum()


def test_nonfinite_loss_leaves_params_and_optimizer_untouched():
  params, batch = _linear_setup(seed=1)
  optim = run_config.base_config().optim
  optim.warmup_steps = 0  # warmup starts at lr 0: the first step would not move anything
  tx, lr = train.make_optimizer(optim, total_steps=10)
  state = state_lib.create(jax.tree.map(jnp.asarray, params), tx, seed=0)
  step = train.make_step(_linear_loss, tx, lr)
  state, m_good = step(state, jax.tree.map(jnp.asarray, batch))
  assert float(m_good["nonfinite"]) == 0.0
  before_params, before_opt = _np_tree(state.params), _np_tree(state.opt_state)
  assert not np.allclose(before_params["w"], params["w"])
  poisoned = dict(batch, poison=np.ones_like(batch["poison"]))
  state, m_bad = step(state, jax.tree.map(jnp.asarray, poisoned))
  assert float(m_bad["nonfinite"]) == 1.0
  assert not math.isfinite(float(m_bad["loss"]))
  jax.tree.map(np.testing.assert_array_equal, _np_tree(state.params), before_params)
  jax.tree.map(np.testing.assert_array_equal, _np_tree(state.opt_state), before_opt)
  assert int(state.step) == 2
  # and training continues normally afterwards
  state, m_next = step(state, jax.tree.map(jnp.asarray, batch))
  assert float(m_next["nonfinite"]) == 0.0
  assert not np.allclose(np.asarray(state.params["w"]), before_params["w"])


def test_step_updates_router_bias_outside_the_optimizer():
  """The correction bias moves by the balancing rule from the loss's expert counts (not by
  gradients), and expert_load_max_over_mean is reported; a non-finite step leaves it alone."""
  key = "moe/router_bias"
  counts = jnp.asarray([[6.0, 1.0, 1.0, 0.0]])

  def loss_fn(params, batch, rng, frozen):
    loss, m = _linear_loss(params, batch, rng, frozen)
    # the bias enters the loss, but only the balancing rule may move it
    loss = loss + 100.0 * jnp.sum(params["moe"]["router_bias"])
    return loss, dict(m, _counts={key: counts})

  params, batch = _linear_setup(seed=2)
  params["moe"] = {"router_bias": np.zeros((1, 4), np.float32)}
  tx = optax.sgd(0.1)
  state = state_lib.create(jax.tree.map(jnp.asarray, params), tx, seed=0)
  assert set(state.router_bias) == {key} and "moe" not in state.params
  step = train.make_step(loss_fn, tx, bias_gamma=0.01)
  state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(np.asarray(state.router_bias[key]), [[-0.01, 0.01, 0.01, 0.01]],
                             atol=1e-7)
  assert float(metrics["expert_load_max_over_mean"]) == pytest.approx(6 / 2)
  poisoned = dict(batch, poison=np.ones_like(batch["poison"]))
  state, _ = step(state, jax.tree.map(jnp.asarray, poisoned))
  np.testing.assert_allclose(np.asarray(state.router_bias[key]), [[-0.01, 0.01, 0.01, 0.01]],
                             atol=1e-7)
  full = train.full_params(state)
  np.testing.assert_array_equal(np.asarray(full["moe"]["router_bias"]),
                                np.asarray(state.router_bias[key]))


def test_stage_state_compiles_the_step_once():
  """A stage's fresh state enters the step with the shardings the step gives back, so the step
  compiles once per stage. (Leaves left on one device compiled it again at step 2 on a one-device
  mesh: ~25 s per stage at r1_tiny size.)"""
  params, batch = _linear_setup(seed=0)
  optim = run_config.base_config().optim
  tx, lr = train.make_optimizer(optim, total_steps=10)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  ctx = types.SimpleNamespace(mesh=mesh, seed=lambda name: 0)
  state = common.new_state(ctx, jax.tree.map(jnp.asarray, params), tx, "stage")
  step = train.make_step(_linear_loss, tx, lr)
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, _ = step(state, jax.tree.map(jnp.asarray, batch))
  assert int(state.step) == 3
  assert step._cache_size() == 1


@pytest.mark.parametrize("kind, warmup, total", [("cosine", 20, 200), ("constant", 0, 50),
                                                 ("constant", 5, 50), ("cosine", 0, 30)])
def test_lr_schedule_matches_optax(kind, warmup, total):
  """The schedule carried in the optimizer state is optax's linear warmup joined to its
  constant or cosine-decay schedule."""
  optim = run_config.base_config().optim
  optim.update(lr=2e-3, warmup_steps=warmup, schedule=kind, min_lr_ratio=0.1)
  decay = (optax.cosine_decay_schedule(2e-3, total - warmup, alpha=0.1) if kind == "cosine"
           else optax.constant_schedule(2e-3))
  ref = decay if not warmup else optax.join_schedules(
      [optax.linear_schedule(0.0, 2e-3, warmup), decay], [warmup])
  values = jnp.asarray(train.optim.schedule_values(optim, total), jnp.float32)
  for step in range(total + 5):
    assert float(train.optim.lr_at(step, values)) == pytest.approx(float(ref(step)), rel=1e-6,
                                                                   abs=1e-12)


def test_stages_differing_only_in_schedule_share_one_program():
  """A cold start (2e-3, warmup, cosine over 200 steps) and a control (2e-4 constant over 50)
  lower to the same program: the schedule is an input, so the second stage's compile is a
  cache hit. The lr each applies is still its own."""
  params, batch = _linear_setup(seed=0)
  batch = jax.tree.map(jnp.asarray, batch)
  lowered, lrs = [], []
  for fields, total in ((dict(lr=2e-3, warmup_steps=20, schedule="cosine"), 200),
                        (dict(lr=2e-4, warmup_steps=0, schedule="constant"), 50)):
    optim = run_config.base_config().optim
    optim.update(**fields)
    tx, lr = train.make_optimizer(optim, total_steps=total)
    state = state_lib.create(jax.tree.map(jnp.asarray, params), tx, seed=0)
    step = train.make_step(_linear_loss, tx, lr)
    lowered.append(step.lower(state, batch).as_text())
    lrs.append(float(step(state, batch)[1]["lr"]))
  assert lowered[0] == lowered[1]
  assert lrs == [0.0, pytest.approx(2e-4)]
