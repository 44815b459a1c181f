"""On-policy distillation (`distill` stages with mode="on_policy", r1jax.stages.onpolicy): the
batch built from the student's samples, the loss against a per-row reference computed by hand,
and the config rules. The stage itself runs in the shrunk recipe (tests/reliability/: one and two
processes, SIGKILLed inside it and resumed) and in configs/r1_tiny_onpolicy.py."""

import dataclasses
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import model, run_config, train
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.rollout import sampler
from r1jax.run_config import stage
from r1jax.stages import sft
from r1jax.stages.onpolicy import onpolicy_batch
import testing

ROOT = os.path.join(os.path.dirname(__file__), "..")
N_NEW = 8
PROMPT_LENS = (3, 9, 5, 12)


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _init(cfg, seed):
  # x4 on matrices: distributions far from uniform, so a wrong position moves the divergence
  def init(rng):
    return jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, model.init(cfg, rng))
  return testing.jit(init)(jax.random.key(seed))


@pytest.fixture(scope="module")
def models():
  t_cfg = ModelConfig.from_config(_config_module("tiny_moe").get_config().model).replace(
      num_hidden_layers=2, num_nextn_predict_layers=0)
  s_cfg = ModelConfig.preset("qwen2").replace(
      vocab_size=t_cfg.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
  return (t_cfg, _init(t_cfg, 0)), (s_cfg, _init(s_cfg, 1))


@pytest.fixture(scope="module")
def rollout(models):
  """The student's samples, with two rows cut short by hand (as if they had stopped): their
  tokens past `lengths` stay in the arrays and must not count."""
  _, (s_cfg, s_params) = models
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, s_cfg.vocab_size, n).tolist() for n in PROMPT_LENS]
  out = sampler.generate(s_params, s_cfg, prompts, max_new_tokens=N_NEW, eos_id=None,
                         rng=jax.random.key(3), compiler_options=testing.FAST_COMPILE)
  lengths = np.array([N_NEW, 3, N_NEW, 1], np.int32)
  return prompts, dataclasses.replace(
      out, lengths=lengths, completion_mask=np.arange(N_NEW)[None] < lengths[:, None],
      truncated=lengths == N_NEW)


def test_batch_marks_exactly_the_sampled_tokens(rollout):
  prompts, out = rollout
  batch = onpolicy_batch(out)
  P = out.tokens.shape[1] - N_NEW
  assert batch["tokens"].shape == (len(prompts), P + N_NEW - 1)
  for b, p in enumerate(prompts):
    pad, n = P - len(p), int(out.lengths[b])
    np.testing.assert_array_equal(batch["tokens"][b, pad:P], p)
    # position t predicts targets[t]: the targets of the masked positions are the samples
    mask = batch["loss_mask"][b].astype(bool)
    assert mask.sum() == n
    np.testing.assert_array_equal(batch["targets"][b][mask], out.completion[b, :n])
    np.testing.assert_array_equal(np.flatnonzero(mask), P - 1 + np.arange(n))
    # the inputs are the prompt and the samples (the last one is an input only where the row
    # has a column after it)
    real = batch["segment_ids"][b] > 0
    end = min(P + n, batch["tokens"].shape[1])
    np.testing.assert_array_equal(np.flatnonzero(real), np.arange(pad, end))
    np.testing.assert_array_equal(batch["positions"][b][real], np.arange(end - pad))
  # the columns end after the longest sample, rounded up to the bucket
  assert onpolicy_batch(out, length_bucket=4)["tokens"].shape[1] == P + N_NEW - 1
  short = dataclasses.replace(out, lengths=np.minimum(out.lengths, 3))
  cut = onpolicy_batch(short, length_bucket=2)
  assert cut["tokens"].shape[1] == P + 4 - 1
  assert cut["loss_mask"].sum() == np.minimum(out.lengths, 3).sum()
  assert onpolicy_batch(out, multiple=4)["tokens"].shape[1] % 4 == 0


def _reverse_kl_by_row(models, prompts, out, shift=0):
  """KL(student || teacher) at each sampled token's position, each row run alone and unpadded:
  the token mean of each row. shift moves every position (the negative control)."""
  (t_cfg, t_params), (s_cfg, s_params) = models
  forward = testing.jit(model.forward, static_argnums=2)
  width = max(PROMPT_LENS) + N_NEW
  means = []
  for b, p in enumerate(prompts):
    n = int(out.lengths[b])
    seq = list(p) + out.completion[b, :n].tolist()
    # zeros after the row (one compiled shape): the model is causal, so they change no logit
    seq = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
    log_q = jax.nn.log_softmax(forward(s_params, seq, s_cfg)[0].astype(jnp.float32), -1)
    log_p = jax.nn.log_softmax(forward(t_params, seq, t_cfg)[0].astype(jnp.float32), -1)
    rows = len(p) - 1 + np.arange(n) + shift
    rows = rows[rows < len(p) + n]
    q, lq, lp = (np.asarray(a, np.float64)[rows] for a in (jnp.exp(log_q), log_q, log_p))
    means.append((q * (lq - lp)).sum(-1).mean() if len(rows) else np.nan)
  return np.asarray(means)


def test_loss_is_the_reverse_kl_at_the_positions_the_student_visited(models, rollout):
  (t_cfg, t_params), (s_cfg, s_params) = models
  prompts, out = rollout
  batch = {k: jnp.asarray(v) for k, v in onpolicy_batch(out, length_bucket=4).items()}
  loss_fn = jax.jit(train.distill_loss(s_cfg, t_cfg, kind="reverse_kl"))
  want = _reverse_kl_by_row(models, prompts, out)
  assert want.min() > 0.05  # the two models disagree: a misplaced position would show
  # the whole batch: the token mean over every row's samples
  loss, metrics = loss_fn(s_params, batch, None, t_params)
  whole = float((want * out.lengths).sum() / out.lengths.sum())
  np.testing.assert_allclose(float(loss), whole, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["divergence"]), whole, rtol=2e-5)
  assert int(metrics["tokens"]) == int(out.lengths.sum())
  # each row alone
  got = np.asarray([float(loss_fn(s_params, {k: v[b:b + 1] for k, v in batch.items()}, None,
                                  t_params)[0]) for b in range(len(prompts))])
  np.testing.assert_allclose(got, want, rtol=2e-5)
  # negative control: the positions one later give other values, far outside the tolerance
  shifted = _reverse_kl_by_row(models, prompts, out, shift=1)
  assert np.nanmax(np.abs(shifted - want) / want) > 1e-2, (shifted, want)
  # the gradient reaches the student: the loss is a function of its parameters
  grads = jax.grad(lambda p: loss_fn(p, batch, None, t_params)[0])(s_params)
  assert float(jax.tree.reduce(lambda a, x: a + jnp.sum(jnp.abs(x)), grads, 0.0)) > 0


def _onpolicy_config(**distill_opd):
  c = _config_module("r1_tiny_onpolicy").get_config()
  c.stages.distill_opd.update(distill_opd)
  return c


def test_the_shipped_config_validates_and_continues_r1_tinys_student():
  c = _config_module("r1_tiny_onpolicy").get_config()
  run_config.validate(c)
  stages = run_config.stage_configs(c)
  assert c.stage_order[-4:] == ("distill", "distill_opd", "distill_more", "distill_logit")
  assert stages["distill_opd"].mode == "on_policy"
  assert stages["distill_opd"].start_from == stages["distill_more"].start_from == "distill"
  assert stages["distill_more"].match_compute_of == "distill_opd"
  assert stages["distill_logit"].mode == "logit" and stages["distill_logit"].branch
  assert stages["distill_more"].branch and stages["distill"].steps == 500  # r1_tiny's


@pytest.mark.parametrize("change, message", [
    (dict(start_from=""), r"stages\.distill_opd\.start_from='' must name an earlier distill "
                          r"stage in on_policy mode"),
    (dict(start_from="grpo"), r"stages\.distill_opd\.start_from='grpo' must name a distill "
                              r"stage that runs before it"),
    (dict(start_from="distill_more"), r"start_from='distill_more' must name a distill stage "
                                      r"that runs before it"),
    (dict(ce_weight=0.5), r"stages\.distill_opd\.ce_weight=0\.5 must be 0 in on_policy mode"),
    (dict(match_compute_of="distill"), r"match_compute_of='distill' is for sequence and logit"),
    (dict(group_size=0), r"stages\.distill_opd\.group_size=0 must be >= 1"),
    (dict(sample_temperature=0.0), r"stages\.distill_opd\.sample_temperature=0\.0 must be "
                                   r"positive and finite"),
    (dict(max_new_tokens=0), r"stages\.distill_opd\.max_new_tokens=0 must be >= 1"),
    (dict(data_file="samples/rejection.jsonl"), r"stages\.distill_opd\.data_file="
                                                r"'samples/rejection\.jsonl' is for sequence"),
    (dict(teacher="distill"), r"stages\.distill_opd\.teacher='distill' must name a "
                              r"pretrain/sft/grpo stage that runs before it"),
    (dict(teacher="nope"), r"stages\.distill_opd\.teacher='nope' must name a"),
    (dict(mode="online"), r"stages\.distill_opd\.mode='online' must be 'sequence', 'logit' or "
                          r"'on_policy'"),
])
def test_bad_on_policy_stages_are_one_clear_config_error(change, message):
  with pytest.raises(ConfigError, match=message):
    run_config.validate(_onpolicy_config(**change))


def test_a_continued_student_has_no_student_section_and_its_rows_split_evenly():
  c = _onpolicy_config()
  c.stages.distill_opd.student = dict(hidden_size=64)
  with pytest.raises(ConfigError, match=r"stages\.distill_opd\.student=.* must be empty with "
                                        r"start_from"):
    run_config.validate(c)
  c = _onpolicy_config()
  c.train.accum_steps = 3  # divides no 16 x 4 rows (nor data.batch_size 32: that check is later)
  with pytest.raises(ConfigError, match="must divide stages.distill_opd's prompts_per_step x "
                                        "group_size = 64"):
    run_config.validate(c)
  c = _onpolicy_config()
  c.stages.extra = stage("distill", steps=10, start_from="distill_opd")  # defined, not run
  run_config.validate(c)


def test_the_teacher_is_the_current_policy_or_the_named_stages_output():
  ctx = types.SimpleNamespace(models={"policy": "grpo_final's"},
                              outputs={"grpo": "grpo's", "grpo_final": "grpo_final's"})
  c = _onpolicy_config()
  run_config.validate(c)
  assert sft.teacher_model(ctx, run_config.stage_configs(c)["distill_opd"]) == "grpo_final's"
  c.stages.distill_opd.teacher = "grpo"
  run_config.validate(c)
  assert sft.teacher_model(ctx, run_config.stage_configs(c)["distill_opd"]) == "grpo's"
