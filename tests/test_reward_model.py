"""Reward models: the Bradley-Terry loss, preference-pair batches, the pairs rejection sampling
writes, the `reward_model` reward a GRPO stage binds, the stage's config rules, and a reward
model that learns. The model itself (a `*ForSequenceClassification` equal to transformers') is
checked in tests/test_reward_model_hf.py; the stage runs through the launcher, is killed and
resumed, and runs on two processes in tests/reliability (the shrunk recipe's `rm` stage, whose
model scores the shrunk `grpo`)."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import testing
from r1jax import model, run_config, train
from r1jax.data import pipeline, template as template_lib
from r1jax.data.tokenizer import CharTokenizer
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.rollout import engine, rewards
from r1jax.stages import rejection
from r1jax.stages.configs import RejectionConfig
from r1jax.train.losses import reward as reward_loss_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RM_CONFIG = os.path.join(ROOT, "configs", "r1_tiny_rm.py")
TOK = CharTokenizer()
CFG = ModelConfig.from_config(run_config.tiny_student_fields(
    num_labels=1, num_hidden_layers=2, hidden_size=32, intermediate_size=64))


def _pairs(n, seed=0):
  """Pairs whose chosen completion ends in "ok" and rejected one in "no", after varied text."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = rng.integers(0, 99, 2)
    filler = "".join(rng.choice(list("0123456789+;="), int(rng.integers(1, 9))))
    out.append({"question": f"{a}+{b}", "chosen": f"{filler} ok", "rejected": f"{filler} no"})
  return out


def test_pair_batches_interleave_chosen_and_rejected_rows():
  recs = _pairs(6)
  it = pipeline.pair_batches(recs, TOK, seq_len=40, pairs=3, seed=0, template="r1",
                             shuffle=False, num_epochs=1)
  batch = next(it)
  assert batch["tokens"].shape == (6, 40) and batch["last"].shape == (6,)
  for i, r in enumerate(recs[:3]):
    prompt = template_lib.format_prompt(r["question"], "r1", TOK.markers)
    for side, row in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
      ids = TOK.encode(prompt) + TOK.encode(r[side])
      n = len(ids)
      np.testing.assert_array_equal(batch["tokens"][row, :n], ids)
      assert batch["tokens"][row, n:].sum() == 0 and batch["last"][row] == n - 1
      np.testing.assert_array_equal(batch["segment_ids"][row], np.arange(40) < n)
      np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
  # a row longer than seq_len keeps its end (what is scored)
  long = [{"question": "1+1", "chosen": "x" * 50 + "END", "rejected": "no"}]
  b = next(pipeline.pair_batches(long, TOK, seq_len=16, pairs=1, seed=0, shuffle=False))
  assert TOK.decode(b["tokens"][0].tolist()).endswith("END") and b["last"][0] == 15


def test_bradley_terry_loss_equals_hand_computed():
  params = testing.random_params(CFG, seed=1, std=0.3)
  batch = {k: jnp.asarray(v) for k, v in next(pipeline.pair_batches(
      _pairs(4), TOK, seq_len=32, pairs=4, seed=0, shuffle=False)).items()}
  scores, _ = model.reward_scores(params, batch["tokens"], CFG, last=batch["last"],
                                  segment_ids=batch["segment_ids"],
                                  positions=batch["positions"])
  r = np.asarray(scores[:, 0], np.float64).reshape(4, 2)
  assert np.ptp(r) > 1e-3  # a real spread of scores
  margin = r[:, 0] - r[:, 1]
  bt = np.mean([math.log1p(math.exp(-m)) for m in margin])
  center = np.mean((r[:, 0] + r[:, 1]) ** 2)
  for coef in (0.0, 0.25):
    loss, metrics = reward_loss_lib.reward_loss(CFG, center_coef=coef)(params, batch, None, None)
    np.testing.assert_allclose(float(loss), bt + coef * center, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bt_loss"]), bt, rtol=1e-5)
    assert float(metrics["accuracy"]) == np.mean(margin > 0)
    np.testing.assert_allclose(float(metrics["margin"]), margin.mean(), rtol=1e-5, atol=1e-7)
  # negative control: the pairs the other way round give another loss
  swapped = dict(batch, **{k: batch[k].reshape(4, 2, *batch[k].shape[1:])[:, ::-1].reshape(
      batch[k].shape) for k in pipeline.PAIR_FIELDS})
  other, _ = reward_loss_lib.reward_loss(CFG)(params, swapped, None, None)
  np.testing.assert_allclose(float(other), np.mean([math.log1p(math.exp(m)) for m in margin]),
                             rtol=1e-5)
  assert abs(float(other) - bt) > 1e-3


def test_a_reward_model_learns_held_out_pairs():
  """40 Adam steps on pairs told apart by their last words: held-out pairs (other questions and
  fillers) scored the right way round, from 2 of 16 before."""
  import optax
  train_pairs, held = _pairs(64, seed=0), _pairs(16, seed=1)
  tx = optax.adam(3e-3)
  state = train.create(testing.random_params(CFG, seed=2), tx, 0)
  step = train.make_step(reward_loss_lib.reward_loss(CFG), tx)
  it = pipeline.pair_batches(train_pairs, TOK, seq_len=32, pairs=8, seed=0)
  held_batch = {k: jnp.asarray(v) for k, v in next(pipeline.pair_batches(
      held, TOK, seq_len=32, pairs=16, seed=0, shuffle=False)).items()}
  loss = reward_loss_lib.reward_loss(CFG)
  before = float(loss(train.full_params(state), held_batch, None, None)[1]["accuracy"])
  for _ in range(40):
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in next(it).items()})
  _, after = loss(train.full_params(state), held_batch, None, None)
  assert before < 0.5 and float(after["accuracy"]) == 1.0, (before, after)
  assert float(metrics["loss"]) < 0.2


def test_bind_scopes_the_model_reward_and_its_errors_propagate():
  calls = []

  def scorer(prompts, completions, **_):
    calls.append(len(completions))
    return [float(len(c)) for c in completions]

  with pytest.raises(RuntimeError, match="none is bound"):
    rewards.combine({"reward_model": 1.0}, ["p"], ["abc"])
  with rewards.bind("reward_model", scorer):
    total, per_fn, errors = rewards.combine({"reward_model": 0.5, "format": 1.0}, ["p", "p"],
                                            ["abc", "<think>x</think><answer>1</answer>"])
  assert per_fn["reward_model"] == [3.0, 34.0] and errors["reward_model"] == 0
  assert total[0] == 1.5 and calls == [2]
  with pytest.raises(RuntimeError, match="none is bound"):  # unbound after the block
    rewards.combine({"reward_model": 1.0}, ["p"], ["abc"])
  with rewards.bind("reward_model", lambda p, c, **_: [1.0]):  # a wrong count is an error
    with pytest.raises(RuntimeError, match="1 scores for 2"):
      rewards.combine({"reward_model": 1.0}, ["p", "p"], ["a", "b"])
  with pytest.raises(ValueError, match="scored by a model"):
    rewards.register("reward_model")(scorer)
  assert "reward_model" in rewards.known() and "reward_model" not in rewards.names()


def test_rejection_writes_pairs_of_a_passing_and_a_failing_sample(tmp_path, monkeypatch):
  records = [{"question": f"{i}+1", "answer": str(i + 1)} for i in range(3)]
  # prompt 0: right, wrong, right; prompt 1: all wrong (one text thrice: no pair, and
  # deduplicated); prompt 2: wrong, right, right
  texts = [["<think>a</think>\n<answer>1</answer>", "<think>b</think>\n<answer>7</answer>",
            "<think>c</think>\n<answer>1</answer>"],
           ["<answer>9</answer>"] * 3,
           ["<think>d</think>\n<answer>5</answer>", "<think>e</think>\n<answer>3</answer>",
            "<think>f</think>\n<answer>3</answer>"]]
  completions = [t for row in texts for t in row]

  def fake_rollout(params, cfg, recs, *, repeats, reward_weights, **_):
    rows = [r for r in recs for _ in range(repeats)]
    total, per_fn, errors = engine.score(rows, [""] * len(rows), completions, reward_weights)
    return engine.ScoredRollout(records=rows, prompts=[""] * len(rows), completions=completions,
                                rollout=None, rewards=total, per_reward=per_fn,
                                reward_errors=errors, flops=0.0)

  monkeypatch.setattr(rejection.engine, "rollout", fake_rollout)
  logged = {}

  class Log:
    def metrics(self, name, step, m):
      logged.update(m)

    def info(self, text):
      pass

  from r1jax.stages import common
  ctx = common.Context(config=run_config.base_config(), workdir=tmp_path, model_cfg=CFG,
                       tokenizer=TOK, mesh=None, log=Log(), models={"policy": (CFG, None)},
                       splits={"rl": records})
  def pairs_of(**fields):
    s = RejectionConfig(name="rs", kind="rejection_sampling", num_prompts=3, k=3, pairs=True,
                        **fields)
    rejection.run_rejection(ctx, "rs", s)
    with open(tmp_path / "samples" / "rs_pairs.jsonl") as f:
      return [(p["question"], p["chosen"], p["rejected"]) for p in map(json.loads, f)]

  assert pairs_of() == [("0+1", texts[0][0], texts[0][1]), ("2+1", texts[2][1], texts[2][0])]
  assert logged["num_pairs"] == 2.0
  # up to 3 per prompt: every distinct passing sample against the failing ones, in turn
  assert pairs_of(pairs_per_prompt=3) == [
      ("0+1", texts[0][0], texts[0][1]), ("0+1", texts[0][2], texts[0][1]),
      ("2+1", texts[2][1], texts[2][0]), ("2+1", texts[2][2], texts[2][0])]


def _rm_config(**changes):
  c = run_config.from_file(RM_CONFIG)
  for path, value in changes.items():
    section = c
    *head, last = path.split(".")
    for key in head:
      section = section[key]
    section[last] = value
  return c


def test_the_shipped_config_validates():
  c = _rm_config()
  run_config.validate(c)
  stages = run_config.stage_configs(c)
  assert stages["rm"].kind == "reward_model" and stages["grpo_rm"].reward_model == "rm"
  assert stages["cold_samples"].pairs


@pytest.mark.parametrize("changes, message", [
    ({"stages.grpo_rm.reward_model": ""}, "reward_model='' must name a reward_model stage"),
    ({"stages.grpo.reward_model": "rm"}, "names no model-scored reward"),
    ({"stages.grpo_rm.reward_model": "grpo"}, "must name a reward_model stage that runs before"),
    ({"stages.grpo_rm.reward_model": "/no/such/dir"}, "neither a stage nor a checkpoint"),
    ({"stages.rm.data_file": ""}, "must name a JSONL file of preference pairs"),
    ({"stages.rm.pairs_per_step": 0}, "pairs_per_step=0 must be >= 1"),
    ({"stages.rm.heldout_frac": 1.0}, "heldout_frac=1.0 must be in [0, 1)"),
    ({"stages.rm.start_from": "cold_samples"}, "start_from='cold_samples' must name a"),
    ({"stages.grpo_rm.start_from": "rm"}, "start_from='rm' must name a pretrain/sft/grpo stage"),
    ({"stages.grpo_rm.ref_from": "rm"}, "ref_from='rm' must name a pretrain/sft/grpo stage"),
    ({"stages.grpo_rm.ref_from": "cold_start", "stages.grpo_rm.beta": 0.0},
     "ref_from='cold_start' needs beta > 0"),
    ({"stages.grpo_rm.ref_from": "cold_start", "stages.grpo_rm.ref_refresh_every": 5},
     "cannot be set with ref_refresh_every"),
    ({"stages.grpo_rm.ref_from": "cold_start", "lora.rank": 4},
     "ref_from cannot be set with LoRA"),
    ({"stages.cold_samples.reward_weights": {"reward_model": 1.0}},
     "rejection sampling keeps samples by rule rewards"),
    ({"train.accum_steps": 3, "stages.rm.pairs_per_step": 16, "data.batch_size": 3,
      "stages.grpo.prompts_per_step": 3, "stages.grpo_rm.prompts_per_step": 3},
     "must divide stages.rm.pairs_per_step=16"),
])
def test_bad_reward_model_settings_are_one_clear_config_error(changes, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    run_config.validate(_rm_config(**changes))


def test_a_reward_model_is_no_causal_lm():
  assert CFG.num_labels == 1 and "score" in model.abstract(CFG)
  with pytest.raises(Exception, match="(?i)classifier|num_labels|LM head"):
    model.forward(testing.random_params(CFG), jnp.zeros((1, 4), jnp.int32), CFG)


def test_held_out_pairs_share_no_question_with_the_training_pairs(tmp_path):
  from r1jax.errors import DataError
  from r1jax.stages import common, reward_model
  from r1jax.stages.configs import RewardModelConfig
  pairs = [dict(p, question=f"{i % 10}+1") for i, p in enumerate(_pairs(40))]  # 4 per question
  pipeline.write_jsonl(tmp_path / "pairs.jsonl", pairs)
  ctx = common.Context(config=run_config.base_config(), workdir=tmp_path, model_cfg=CFG,
                       tokenizer=TOK, mesh=None, log=None, models={})
  s = RewardModelConfig(name="rm", kind="reward_model", data_file="pairs.jsonl",
                        heldout_frac=0.3, pairs_per_step=4)
  training, held = reward_model.split_pairs(ctx, "rm", s)
  held_q, train_q = {p["question"] for p in held}, {p["question"] for p in training}
  assert len(held_q) == 3 and len(train_q) == 7 and not held_q & train_q
  assert len(held) == 12 and len(training) == 28
  assert reward_model.split_pairs(ctx, "rm", s) == (training, held)  # seeded
  with pytest.raises(DataError, match="fewer than pairs_per_step=64"):
    reward_model.split_pairs(ctx, "rm", RewardModelConfig(
        name="rm", kind="reward_model", data_file="pairs.jsonl", pairs_per_step=64))
  with pytest.raises(DataError, match="no preference pairs"):
    reward_model.split_pairs(ctx, "rm", RewardModelConfig(
        name="rm", kind="reward_model", data_file="none.jsonl"))


def test_a_continued_reward_model_keeps_its_predecessors_split_and_pools_files(tmp_path):
  """Iterated reward modelling: rm2 continues rm on rm's pairs plus new ones. rm's held-out
  questions stay held out and its training questions stay in training; only the questions new
  to rm2 are split, by rm2's heldout_frac."""
  from r1jax.errors import DataError
  from r1jax.stages import common, reward_model
  pairs_a = [dict(p, question=f"{i % 10}+1") for i, p in enumerate(_pairs(40))]  # 0..9, 4 each
  pairs_b = [dict(p, question=f"{5 + i % 10}+1") for i, p in enumerate(_pairs(40, seed=1))]
  pipeline.write_jsonl(tmp_path / "a.jsonl", pairs_a)
  pipeline.write_jsonl(tmp_path / "b.jsonl", pairs_b)  # 5..9 seen by rm, 10..14 new
  c = run_config.base_config()
  c.stages.rm = run_config.stage("reward_model", 0, data_file="a.jsonl", heldout_frac=0.3,
                                 pairs_per_step=4)
  c.stages.rm2 = run_config.stage("reward_model", 0, data_file="a.jsonl, b.jsonl",
                                  heldout_frac=0.4, pairs_per_step=4, start_from="rm")
  stages = run_config.stage_configs(c)
  ctx = common.Context(config=c, workdir=tmp_path, model_cfg=CFG, tokenizer=TOK, mesh=None,
                       log=None, models={})
  questions = lambda pairs: {p["question"] for p in pairs}
  train1, held1 = reward_model.split_pairs(ctx, "rm", stages["rm"])
  train2, held2 = reward_model.split_pairs(ctx, "rm2", stages["rm2"])
  assert len(train2) + len(held2) == 80  # both files pooled
  new = {f"{q}+1" for q in range(10, 15)}
  assert questions(held2) - new == questions(held1) and len(questions(held1)) == 3
  assert questions(train1) <= questions(train2) and not questions(train2) & questions(held2)
  assert len(questions(held2) & new) == 2  # round(0.4 * 5) of the new questions
  assert reward_model.split_pairs(ctx, "rm2", stages["rm2"]) == (train2, held2)  # seeded
  with pytest.raises(DataError, match="no preference pairs at .*none.jsonl"):
    reward_model.read_pairs(ctx, "rm3", dataclasses.replace(stages["rm2"],
                                                            data_file="a.jsonl,none.jsonl"))
  (tmp_path / "empty.jsonl").write_text("")  # a round that made no pair adds none
  assert reward_model.read_pairs(ctx, "rm3", dataclasses.replace(
      stages["rm2"], data_file="a.jsonl,empty.jsonl")) == reward_model.read_pairs(
          ctx, "rm", stages["rm"])
  with pytest.raises(DataError, match="its files hold no preference pairs"):
    reward_model.read_pairs(ctx, "rm3", dataclasses.replace(stages["rm2"],
                                                            data_file="empty.jsonl,empty.jsonl"))


def test_a_reward_model_stage_continues_an_earlier_reward_model_whole():
  """start_from an earlier reward model: trunk and score head as it left them (from a causal
  LM: its trunk and a fresh head)."""
  from r1jax import parallel
  from r1jax.stages import common, reward_model
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  rm_params = testing.random_params(CFG, seed=5)
  lm_cfg = CFG.replace(num_labels=0)
  lm_params = testing.random_params(lm_cfg, seed=6)
  ctx = common.Context(config=run_config.base_config(), workdir=None, model_cfg=lm_cfg,
                       tokenizer=TOK, mesh=mesh, log=None, models={"policy": (lm_cfg, lm_params)},
                       outputs={"rm": (CFG, rm_params)})
  s = run_config.stage_configs(_rm_stages(rm2=dict(start_from="rm")))["rm2"]
  cfg, params = reward_model.initial_params(ctx, "rm2", s)
  assert cfg == CFG and params is rm_params
  cfg, params = reward_model.initial_params(ctx, "rm0", dataclasses.replace(s, start_from=""))
  assert cfg.num_labels == 1
  np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(lm_params["embed"]))
  assert not np.allclose(np.asarray(params["score"]), np.asarray(rm_params["score"]))


def _rm_stages(**stages):
  c = run_config.base_config()
  for name, fields in stages.items():
    c.stages[name] = run_config.stage("reward_model", 0, data_file="x.jsonl", **fields)
  return c


def test_the_iterated_config_chains_its_rounds():
  c = run_config.from_file(os.path.join(ROOT, "configs", "r1_tiny_rm_iter.py"))
  run_config.validate(c)
  stages = run_config.stage_configs(c)
  order = list(c.stage_order)
  assert order[:5] == list(run_config.from_file(RM_CONFIG).stage_order)
  rounds = [n for n in order if stages[n].kind == "grpo" and n.startswith("rm_it")]
  assert len(rounds) == 10 and sum(stages[n].steps for n in rounds) == stages["grpo_rm"].steps
  rm, files = "rm", 1
  for i, name in enumerate(rounds):
    s = stages[name]
    assert (s.reward_model, s.ref_from, s.branch) == (rm, "cold_start", False)
    assert s.start_from == ("cold_start" if i == 0 else "") and s.eval == (i == 9)
    if i < 9:
      samples, rm_next = stages[name + "_samples"], stages[name + "_rm"]
      assert samples.pairs and order.index(name) < order.index(rm_next.name)
      files += 1
      assert rm_next.start_from == rm and len(rm_next.data_file.split(",")) == files
      assert rm_next.data_file.endswith(f"samples/{name}_samples_pairs.jsonl")
      rm = rm_next.name


def test_the_scorer_scores_each_row_as_the_model_does_on_a_mesh():
  """ModelReward on a 2-device data mesh, 5 rows (padded to 6, the padding dropped): the scores
  of model.reward_scores on each row alone, and the forwards' FLOPs counted."""
  from r1jax import flops, parallel
  from r1jax.rollout.reward_model import ModelReward
  params = testing.random_params(CFG, seed=3, std=0.3)
  mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
  scorer = ModelReward(CFG, parallel.shard_params(params, CFG, mesh), TOK, mesh, max_len=64)
  prompts = [template_lib.format_prompt(q, "r1", TOK.markers) for q in
             ("1+2", "33+4", "5+66", "7+8", "9+10")]
  completions = ["3", "<think>x</think><answer>37</answer>", "", "15 and more text", "19"]
  got = scorer(prompts, completions)
  for p, c, score in zip(prompts, completions, got):
    ids = jnp.asarray([TOK.encode(p) + TOK.encode(c)], jnp.int32)
    want, _ = model.reward_scores(params, ids, CFG, last=jnp.asarray([ids.shape[1] - 1]))
    np.testing.assert_allclose(score, float(want[0, 0]), rtol=2e-5, atol=2e-6)
  assert len(set(np.round(got, 5))) == 5  # distinct rows, distinct scores
  longest = max(len(TOK.encode(p) + TOK.encode(c)) for p, c in zip(prompts, completions))
  T = -(-longest // 16) * 16  # the 16-token bucket
  assert T > longest - 16 and scorer.flops == flops.forward_flops(CFG, 6 * T, T)


def test_an_ensemble_scores_the_mean_or_the_lowest_of_its_members():
  from r1jax import parallel
  from r1jax.rollout.reward_model import Ensemble, ModelReward
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  members = [ModelReward(CFG, parallel.shard_params(testing.random_params(CFG, seed=s, std=0.3),
                                                   CFG, mesh), TOK, mesh, max_len=64)
             for s in (7, 8, 9)]
  prompts = [template_lib.format_prompt(q, "r1", TOK.markers) for q in ("1+2", "3+4", "50+6")]
  completions = ["3", "<answer>7</answer>", "56 and text"]
  each = np.asarray([m(prompts, completions) for m in members])
  assert (each.max(0) - each.min(0) > 1e-3).all()  # the members disagree on every row
  lowest = Ensemble(members, "min")
  np.testing.assert_allclose(lowest(prompts, completions), each.min(0), rtol=1e-6)
  np.testing.assert_allclose(Ensemble(members, "mean")(prompts, completions), each.mean(0),
                             rtol=1e-6)
  assert lowest.flops == sum(m.flops for m in members) > 0
  assert members[0]._scores is members[2]._scores  # one compiled forward for the ensemble
  assert lowest([], []) == []


def test_the_ensemble_config_validates_and_its_rules_hold():
  c = run_config.from_file(os.path.join(ROOT, "configs", "r1_tiny_rm_ensemble.py"))
  run_config.validate(c)
  s = run_config.stage_configs(c)["grpo_ens"]
  assert s.reward_models == ["rm", "rm_2", "rm_3", "rm_4"] and s.reward_model_aggregate == "min"
  for changes, message in (
      ({"reward_model": "rm,rm_2,rm"}, "names a reward model twice"),
      ({"reward_model_aggregate": "max"}, r"must be one of \('mean', 'min'\)"),
      ({"reward_model": "rm,grpo"}, "reward_model='grpo' must name a reward_model stage"),
      ({"reward_model": "rm, /no/such/dir"}, "'/no/such/dir' is neither a stage nor")):
    bad = run_config.from_file(os.path.join(ROOT, "configs", "r1_tiny_rm_ensemble.py"))
    bad.stages.grpo_ens.update(changes)
    with pytest.raises(ConfigError, match=message):
      run_config.validate(bad)


def test_a_hf_classifier_directory_is_a_grpo_stages_reward_model(tmp_path):
  from r1jax import hf, parallel
  from r1jax.stages import common, reward_model
  params = testing.random_params(CFG, seed=4)
  hf.save(str(tmp_path / "rm"), CFG, params)
  hf.save(str(tmp_path / "lm"), CFG.replace(num_labels=0),
          testing.random_params(CFG.replace(num_labels=0)))
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  ctx = common.Context(config=run_config.base_config(), workdir=tmp_path, model_cfg=CFG,
                       tokenizer=TOK, mesh=mesh, log=None, models={})
  cfg, loaded = reward_model.load_reward_model(ctx, str(tmp_path / "rm"), "stages.g.reward_model")
  assert cfg.num_labels == 1
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ConfigError, match="not a one-label sequence classifier"):
    reward_model.load_reward_model(ctx, str(tmp_path / "lm"), "stages.g.reward_model")
  ctx.outputs["rm"] = (CFG, params)  # an earlier stage's output comes first
  assert reward_model.load_reward_model(ctx, "rm", "x")[1] is params
