"""Arithmetic chain-of-thought task, its covered/uncovered splits, and the reasoning-gym adapter."""

import dataclasses
import sys
import types

import numpy as np
import pytest

from r1jax.data import tasks
from r1jax.errors import DataError


def _answer_from_trace(question: str, trace: str) -> str:
  """Read the answer off a trace: last digit of each column, plus a final carry for '+'."""
  results = [step.split("=")[1] for step in trace.split(";")]
  if "+" in question:
    digits = [r[-1] for r in results]
    carry = results[-1][:-1]
    return (carry + "".join(reversed(digits))).lstrip("0") or "0"
  return "".join(reversed(results)).lstrip("0") or "0"


def test_traces_by_hand():
  assert tasks.add_trace(47, 385) == "7+5=12;4+8+1=13;3+1=4"
  assert tasks.add_trace(99, 1) == "9+1=10;9+1=10"
  assert tasks.add_trace(3, 5, 8) == "3+5+8=16"
  assert tasks.add_trace(99, 99, 99) == "9+9+9=27;9+9+9+2=29"
  assert tasks.sub_trace(385, 47) == "15-7=8;8-4-1=3;3=3"
  assert tasks.sub_trace(100, 1) == "10-1=9;10-1=9;1-1=0"


@pytest.mark.parametrize("ops", [("+",), ("+", "-")])
def test_records_are_correct_and_traces_lead_to_answers(ops):
  records = tasks.arithmetic_records(300, seed=3, min_digits=1, max_digits=3, ops=ops)
  assert len({r["question"] for r in records}) == 300
  for r in records:
    a, op, b = r["question"].partition("+" if "+" in r["question"] else "-")
    assert op in ops
    expected = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert r["answer"] == str(expected) and expected >= 0
    assert _answer_from_trace(r["question"], r["reasoning"]) == r["answer"], r
    assert r["difficulty"] == max(len(a), len(b))
  assert {r["difficulty"] for r in records} == {1, 2, 3}
  if len(ops) == 2:
    assert {"+", "-"} <= {c for r in records for c in r["question"]}


def test_records_deterministic_per_seed():
  first = tasks.arithmetic_records(50, seed=7, min_digits=2, max_digits=3)
  assert first == tasks.arithmetic_records(50, seed=7, min_digits=2, max_digits=3)
  assert first != tasks.arithmetic_records(50, seed=8, min_digits=2, max_digits=3)
  assert all(2 <= len(n) <= 3 for r in first for n in r["question"].split("+"))


def test_records_space_too_small():
  # 1-digit addition has 100 ordered questions but 55 problems up to operand order.
  assert len(tasks.arithmetic_records(55, seed=0, min_digits=1, max_digits=1)) == 55
  with pytest.raises(ValueError, match="only 55 distinct problems"):
    tasks.arithmetic_records(56, seed=0, min_digits=1, max_digits=1)


def test_splits_disjoint_and_bucketed():
  splits = tasks.arithmetic_splits(0, n_sft=300, n_rl=200, n_eval=100)
  questions = {name: [r["question"] for r in recs] for name, recs in splits.items()}
  for name, qs in questions.items():
    assert len(qs) == len(set(qs)), name
  sft, rl, held_out = (set(questions[k]) for k in ("sft", "rl", "eval"))
  assert not held_out & (sft | rl) and not sft & rl
  assert len(sft) == 300 and len(rl) == 200 and len(held_out) == 200
  assert all(r["bucket"] == "covered" and r["difficulty"] <= 2 and r["reasoning"]
             for r in splits["sft"])
  for name in ("rl", "eval"):
    assert all(r["reasoning"] is None and r["answer"] for r in splits[name]), name
    uncovered = [r for r in splits[name] if r["bucket"] == "uncovered"]
    assert len(uncovered) == len(splits[name]) // 2, name
    assert all(r["difficulty"] == 3 for r in uncovered)
  # The held-out set does not move when the training sizes do.
  assert tasks.arithmetic_splits(0, n_sft=50, n_rl=10, n_eval=100)["eval"] == splits["eval"]
  assert tasks.arithmetic_splits(1, n_sft=50, n_rl=10, n_eval=100)["eval"] != splits["eval"]


def test_reasoning_gym_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # Makes the import fail.
  with pytest.raises(DataError, match="reasoning_gym is not installed: pip install reasoning-gym"):
    tasks.reasoning_gym_records("basic_arithmetic", 2, seed=0)


def test_reasoning_gym_adapter_with_fake_module(monkeypatch):
  calls = []

  def create_dataset(name, size, seed, **config):
    calls.append((name, size, seed, config))
    if name != "chain_sum":
      raise ValueError(f"Dataset '{name}' not registered")
    return [{"question": f"q{i}", "answer": i * seed, "metadata": {"difficulty": {"terms": 2}}}
            for i in range(size)]

  fake = types.ModuleType("reasoning_gym")
  fake.create_dataset = create_dataset
  monkeypatch.setitem(sys.modules, "reasoning_gym", fake)
  records = tasks.reasoning_gym_records("chain_sum", 3, seed=5, min_terms=2)
  assert calls == [("chain_sum", 3, 5, {"min_terms": 2})]
  assert records[2] == dict(question="q2", reasoning=None, answer="10",
                            difficulty={"terms": 2}, task="chain_sum",
                            metadata={"difficulty": {"terms": 2}})
  with pytest.raises(DataError, match="reasoning-gym task 'nope': Dataset 'nope' not registered"):
    tasks.reasoning_gym_records("nope", 1, seed=0)


@pytest.mark.parametrize("digits, operands", [((3, 3), 2), ((1, 1), 3)])
def test_splits_are_disjoint_up_to_operand_order(digits, operands):
  """No held-out problem is a training problem with its operands reordered (same multiset of
  operands, same answer): not among the SFT traces, the RL prompts, nor the rejection-sampling
  prompts (a prefix of the RL prompts); nor do two problems of one split share their operands.
  The space here is small (3-term chains of digits: 220 multisets), where the old string-level
  disjointness let 49 of 50 held-out chains be reordered RL prompts."""
  splits = tasks.arithmetic_splits(0, n_sft=60, n_rl=150, n_eval=30, uncovered_digits=digits,
                                   uncovered_operands=operands)
  keys = {name: [tasks.problem_key(r["question"]) for r in recs] for name, recs in splits.items()}
  for name, ks in keys.items():
    assert len(ks) == len(set(ks)), name
  train = set(keys["sft"]) | set(keys["rl"])
  assert not set(keys["eval"]) & train
  assert not set(keys["sft"]) & set(keys["rl"])
  assert tasks.problem_key("3+5+8") == tasks.problem_key("8+3+5") != tasks.problem_key("3+5+9")
  assert tasks.problem_key("12+7") == tasks.problem_key("7+12")


def test_three_term_uncovered_bucket():
  """Chains a+b+c as the uncovered bucket: RL and eval get them, the SFT traces never do."""
  splits = tasks.arithmetic_splits(0, n_sft=50, n_rl=40, n_eval=30, uncovered_digits=(1, 1),
                                   uncovered_operands=3)
  assert all(r["question"].count("+") == 1 for r in splits["sft"])
  for name in ("rl", "eval"):
    chains = [r for r in splits[name] if r["bucket"] == "uncovered"]
    assert len(chains) == len(splits[name]) // 2
    for r in chains:
      terms = [int(x) for x in r["question"].split("+")]
      assert len(terms) == 3 and all(t < 10 for t in terms) and int(r["answer"]) == sum(terms)


def test_pretrain_corpus_tags_a_seeded_share():
  """R1-Zero's base corpus: bare answers, and a `tagged_frac` share in the think/answer markup
  with no worked steps (the think block restates the question); the markup passes the format
  reward once the R1-Zero prompt has opened <think>."""
  from r1jax.data import template
  from r1jax.rollout import rewards
  from r1jax.stages import sft
  records = [{"question": f"{i}+{i + 1}", "answer": str(2 * i + 1)} for i in range(400)]
  out = sft.pretrain_records(records, 0.25, seed=0)
  assert out == sft.pretrain_records(records, 0.25, seed=0)
  tagged = [r for r in out if "</think>" in r["completion"]]
  assert 70 <= len(tagged) <= 130
  for r in out:
    if r in tagged:
      assert r["completion"] == f"{r['question']}\n</think>\n<answer>{r['answer']}</answer>"
    else:
      assert r["completion"] == r["answer"]
  prompt = template.format_prompt(tagged[0]["question"], "r1_zero_short")
  assert rewards.get("format")([prompt], [tagged[0]["completion"]]) == [1.0]
  bare = next(r for r in out if r not in tagged)
  assert rewards.get("format")([prompt], [bare["completion"]]) == [0.0]
  assert all("</think>" not in r["completion"] for r in sft.pretrain_records(records, 0.0, 0))


def test_stage_records_with_sft_split(tmp_path):
  """A stage's data file plus, with `with_sft_split`, the task's SFT split (the distillation
  set of r1_tiny: rejection samples + cold-start traces); an empty file leaves just the split."""
  import ml_collections
  from r1jax import fileio
  from r1jax.stages import configs, sft
  (tmp_path / "rs.jsonl").write_text('{"question": "1+2", "completion": "x", "answer": "3"}\n')
  (tmp_path / "empty.jsonl").write_text("")
  split = [{"question": "4+4", "reasoning": "4+4=8", "answer": "8"}]
  ctx = types.SimpleNamespace(workdir=fileio.absolute(tmp_path), splits={"sft": split},
                              config=ml_collections.ConfigDict({"data": {"task": "arithmetic"},
                                                                "seed": 0}))
  stage = configs.parse("distill", {"kind": "distill", "data_file": "rs.jsonl"})
  assert [r["question"] for r in sft.stage_records(ctx, stage)] == ["1+2"]
  stage = dataclasses.replace(stage, with_sft_split=True)
  assert [r["question"] for r in sft.stage_records(ctx, stage)] == ["1+2", "4+4"]
  stage = dataclasses.replace(stage, data_file="empty.jsonl")
  assert [r["question"] for r in sft.stage_records(ctx, stage)] == ["4+4"]
  ctx.splits = {"sft": []}
  with pytest.raises(DataError, match="with_sft_split"):
    sft.stage_records(ctx, stage)


def test_held_out_problems_look_like_the_training_ones():
  """Each split of a bucket is a uniform subset of the bucket's problems. The r1_tiny covered
  bucket (a digit plus a one- or two-digit number) has 955 problems and the splits use 950; when
  each split was rejection-sampled in turn, the eval set (drawn first) took a third of its
  problems from the 55 one-digit sums, and the traces and RL prompts got almost none of them."""
  shares = {"eval": [], "sft": [], "rl": []}
  for seed in range(20):
    splits = tasks.arithmetic_splits(
        seed, n_sft=400, n_rl=2000, n_eval=50, covered_digits=(1, 2), covered_long_operands=1,
        uncovered_digits=(2, 2), uncovered_traces=60, rl_uncovered_frac=0.75)
    for name, records in splits.items():
      covered = [r for r in records if r["bucket"] == "covered"]
      shares[name] += [r["difficulty"] == 1 for r in covered]
  means = {name: np.mean(v) for name, v in shares.items()}
  assert all(abs(m - 55 / 955) < 0.025 for m in means.values()), means


def test_trace_both_orders_adds_the_reversed_sums_and_nothing_else():
  """`trace_both_orders` writes every traced sum both ways (7+45 and 45+7, each with its own
  column trace); the problems (keys) of every split are the same as without it."""
  kw = dict(n_sft=40, n_rl=100, n_eval=20, covered_digits=(1, 2), covered_long_operands=1,
            uncovered_digits=(2, 2), uncovered_traces=10, rl_uncovered_frac=0.75)
  plain = tasks.arithmetic_splits(3, **kw)
  both = tasks.arithmetic_splits(3, trace_both_orders=True, **kw)
  assert both["eval"] == plain["eval"] and both["rl"] == plain["rl"]
  keys = lambda records: sorted(tasks.problem_key(r["question"]) for r in records)
  assert sorted(set(keys(both["sft"]))) == keys(plain["sft"])
  questions = {r["question"] for r in both["sft"]}
  for r in plain["sft"]:
    a, b = r["question"].split("+")
    assert f"{b}+{a}" in questions
  doubles = sum(a == b for a, b in (r["question"].split("+") for r in plain["sft"]))
  assert len(both["sft"]) == 2 * len(plain["sft"]) - doubles
  for r in both["sft"]:
    a, b = map(int, r["question"].split("+"))
    assert r["answer"] == str(a + b) and r["reasoning"] == tasks.add_trace(a, b)
    assert r["reasoning"].split(";")[0].split("=")[0].split("+")[:2] == [str(a % 10), str(b % 10)]


def test_heldout_split_is_drawn_last_and_changes_no_other_split():
  """`n_heldout` adds a large uncovered test set after the RL prompts: every other split is the
  same as without it, and its problems are in no other split, up to operand order."""
  kw = dict(n_sft=40, n_rl=300, n_eval=20, covered_digits=(1, 2), covered_long_operands=1,
            uncovered_digits=(2, 2), uncovered_traces=10, rl_uncovered_frac=0.75,
            trace_both_orders=True)
  plain = tasks.arithmetic_splits(4, **kw)
  more = tasks.arithmetic_splits(4, n_heldout=200, **kw)
  assert "heldout" not in plain and set(more) == {"sft", "rl", "eval", "heldout"}
  assert all(more[k] == plain[k] for k in plain)
  keys = [tasks.problem_key(r["question"]) for r in more["heldout"]]
  assert len(keys) == len(set(keys)) == 200
  taken = {tasks.problem_key(r["question"]) for k in plain for r in plain[k]}
  assert not taken & set(keys)
  assert all(r["bucket"] == "uncovered" and r["reasoning"] is None and r["difficulty"] == 2
             for r in more["heldout"])
