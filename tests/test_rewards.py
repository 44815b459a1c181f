"""Rewards: hand-computed values, math equivalence, time bounds off the main thread, adversarial
completions, and failure isolation in `combine`."""

import logging
import math
import sys
import threading
import time
import types

import numpy as np
import pytest

from r1jax.rollout import _verify, rewards
from testing import in_thread

R1_PROMPT = "<｜User｜>What is 1+1?<｜Assistant｜><think>\n"
ZERO_PROMPT = "User: What is 1+1? Assistant:"


def call(name, completions, prompts=None, **fields):
  """One reward over `completions` (prompts default to the R1-Zero style prompt)."""
  prompts = [ZERO_PROMPT] * len(completions) if prompts is None else prompts
  return rewards.get(name)(prompts, completions, **fields)


# ---------------------------------------------------------------------------------------------
# answer extraction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{3} then \boxed{4}", "4"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                     # escaped braces are literal
    (r"\boxed{5} and \boxed{6", "5"),                        # the last one is unbalanced
    (r"\fbox{7}", "7"),
    ("<answer> 8 </answer>", "8"),
    (r"<answer>\boxed{9}</answer> <answer>10</answer>", "9"),  # a box beats the answer tag
    ("<answer>11", None),                                    # unclosed tag
    ("no answer here", None),
    (r"\boxed{ }", None),                                     # empty
    (r"\boxed{" + "{" * 40 + "1" + "}" * 40 + "}", None),     # nested deeper than the cap
    (r"\boxed{" + "1" * 2000 + "}", None),                   # longer than the cap
])
def test_extract_answer(text, expected):
  assert _verify.extract_answer(text) == expected


def test_extract_answer_searches_only_the_tail():
  early = r"\boxed{1}" + " " * _verify.MAX_SEARCH_CHARS
  assert _verify.extract_answer(early) is None
  assert _verify.extract_answer(early + r"\boxed{2}") == "2"


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, completion, expected", [
    (r"\frac{1}{2}", r"so \boxed{0.5}", 1.0),
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),
    ("2x+1", r"\boxed{1+2x}", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
    ("72", "<think>x</think><answer>72</answer>", 1.0),
    (r"The answer is $\boxed{4}$.", r"\boxed{4}", 1.0),       # gold given as a solution text
    ("2x+1", r"\boxed{1+3x}", 0.0),
    ("72", r"\boxed{73}", 0.0),
    (r"\frac{1}{3}", r"\boxed{\frac{1}{4}}", 0.0),
    ("72", "72 is the answer but never boxed", 0.0),
])
def test_accuracy_hand_made(gold, completion, expected):
  assert call("accuracy", [completion], answer=[gold]) == [expected]


def test_accuracy_without_gold_is_none():
  assert call("accuracy", [r"\boxed{1}", r"\boxed{2}"], answer=[None, "2"]) == [None, 1.0]
  assert call("accuracy", [r"\boxed{1}"]) == [None]


def test_math_verify_agrees_with_the_fast_path():
    # The exact fast path must not change results math-verify would give.
  worker = _verify.default_worker()
  assert worker.equivalent(r"\frac{1}{2}", "0.5") is True
  assert worker.equivalent("72", "73") is False
  assert _verify.fast_equal("0.5", r"\frac{1}{2}") is True
  assert _verify.fast_equal("72", "73") is False
  assert _verify.fast_equal(r"\frac{1}{3}", "0.333333") is None   # left to math-verify


def test_accuracy_off_the_main_thread_is_correct_and_bounded():
  _verify.is_equivalent.cache_clear()   # make every comparison reach the child
  completions = [r"\boxed{1+2x}", r"\boxed{2x+2}", r"\boxed{10^{10^{10}}}"]
  scores, seconds = in_thread(lambda: call("accuracy", completions, answer="2x+1"))
  assert scores == [1.0, 0.0, 0.0]
  assert seconds < 3 * _verify.DEFAULT_TIMEOUT_S + 5   # + start-up of the child


def test_worker_is_killed_and_restarted_past_its_bound():
  worker = _verify.default_worker()
  worker.start()   # start-up (the import of math-verify) is outside the bound
  restarts = worker.restarts
  slow = r"\frac{1}{" * 30 + "2" + "}" * 30                    # ~1 s of parsing

  def timed_out():
    try:
      worker.equivalent("3", slow, timeout_s=0.05)
    except _verify.VerifyTimeout:
      return True
    return False

  raised, seconds = in_thread(timed_out)                      # the bound works off-main too
  assert raised and seconds < 1.0
  assert worker.restarts == restarts + 1
  assert worker.equivalent("2x+1", "1+2x") is True            # the fresh child works


def test_accuracy_timeout_scores_zero_and_warns(monkeypatch, caplog):
  def hang(self, gold, pred, timeout_s=None):
    raise _verify.VerifyTimeout()
  monkeypatch.setattr(_verify.VerifyWorker, "equivalent", hang)
  with caplog.at_level(logging.WARNING):
    assert call("accuracy", [r"\boxed{y+7}"], answer=["7+y"]) == [0.0]
  assert "timed out" in caplog.text
  _verify.is_equivalent.cache_clear()   # do not keep the forced verdict


class FakeTask:
  """A reasoning-gym-like dataset: score_answer(answer, entry) -> float."""

  def __init__(self):
    self.calls = []

  def score_answer(self, answer, entry):
    self.calls.append((answer, entry))
    return 1.0 if answer == entry["answer"] else 0.25


def test_accuracy_with_a_task_object_uses_its_verifier():
  task = FakeTask()
  entries = [{"answer": "cat", "metadata": {}}, {"answer": "dog", "metadata": {}}]
  scores = call("accuracy", ["<answer>cat</answer>", "<answer>cow</answer>"],
                task=task, entry=entries)
  assert scores == [1.0, 0.25]
  assert task.calls == [("cat", entries[0]), ("cow", entries[1])]


def test_accuracy_with_a_reasoning_gym_name(monkeypatch):
  entry = {"answer": "5", "metadata": {"source_dataset": "fake_rg"}}
  fake = types.ModuleType("reasoning_gym")
  fake.factory = types.SimpleNamespace(
      get_score_answer_fn=lambda name: (lambda answer, e: 0.5 if name == "fake_rg" else 0.0))
  rewards._reasoning_gym_scorer.cache_clear()
  monkeypatch.setitem(sys.modules, "reasoning_gym", fake)
  assert call("accuracy", [r"\boxed{5}"], entry=[entry]) == [0.5]
  assert call("accuracy", [r"\boxed{5}"], task="fake_rg", answer="4") == [0.5]
  # Without the package the gold answer (from the entry) decides, quietly.
  rewards._reasoning_gym_scorer.cache_clear()
  monkeypatch.setitem(sys.modules, "reasoning_gym", None)
  assert call("accuracy", [r"\boxed{5}", r"\boxed{6}"], entry=entry) == [1.0, 0.0]
  rewards._reasoning_gym_scorer.cache_clear()


# ---------------------------------------------------------------------------------------------
# format, tag_count, reasoning_steps, language
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, completion, expected", [
    (ZERO_PROMPT, "<think>add</think> <answer>2</answer>", 1.0),
    (ZERO_PROMPT, "<think>\nadd\n</think>\n<answer>\n2\n</answer>\n", 1.0),
    (ZERO_PROMPT, "<think>add</think> The answer is 2.", 1.0),      # R1 style answer
    (R1_PROMPT, "add\n</think>\nThe answer is 2.", 1.0),            # think opened by the prompt
    (R1_PROMPT, "<think>add</think><answer>2</answer>", 1.0),       # opened again: accepted
    (ZERO_PROMPT, "add\n</think>\nThe answer is 2.", 0.0),          # never opened
    (ZERO_PROMPT, "<think> </think><answer>2</answer>", 0.0),       # empty reasoning
    (ZERO_PROMPT, "<think>add</think><answer> </answer>", 0.0),     # empty answer
    (ZERO_PROMPT, "<think>add</think>", 0.0),                       # no answer
    (ZERO_PROMPT, "<think>a</think><think>b</think><answer>2</answer>", 0.0),
    (ZERO_PROMPT, "<think>add</think><answer>2</answer> extra", 0.0),
    (ZERO_PROMPT, "<think>add</think><answer>2", 0.0),
    (ZERO_PROMPT, "<think>add</think>2</answer>", 0.0),
    (ZERO_PROMPT, "<think>add</think><answer>2</answer><answer>3</answer>", 0.0),
])
def test_format(prompt, completion, expected):
  assert call("format", [completion], prompts=[prompt]) == [expected]


def test_format_flag_overrides_detection():
  completion = ["add\n</think>\n2"]
  assert rewards.get("format", think_in_prompt=True)([ZERO_PROMPT], completion) == [1.0]
  assert rewards.get("format", think_in_prompt=False)([R1_PROMPT], completion) == [0.0]


@pytest.mark.parametrize("prompt, completion, expected", [
    (ZERO_PROMPT, "<think>\na\n</think>\n<answer>\nb\n</answer>", 1.0),
    (ZERO_PROMPT, "<think>\na\n</think>\nb", 0.5),
    (ZERO_PROMPT, "<think>\na\n</think>\n<answer>\nb\n</answer><think>\n", 0.75),
    (ZERO_PROMPT, "a\n</think>\n<answer>\nb\n</answer>", 0.75),
    (R1_PROMPT, "a\n</think>\n<answer>\nb\n</answer>", 1.0),
    (ZERO_PROMPT, "", 0.0),
])
def test_tag_count(prompt, completion, expected):
  assert call("tag_count", [completion], prompts=[prompt]) == [expected]


def test_tag_count_on_r1jax_and_open_r1_layouts():
  ours = ["42 = 40 + 2\n</think>\n<answer>42</answer>"]   # r1jax's template, one-line answer
  assert call("tag_count", ours, prompts=[R1_PROMPT]) == [1.0]
  open_r1 = rewards.get("tag_count", tags=rewards.OPEN_R1_TAGS)
  assert open_r1([R1_PROMPT], ours) == [0.5]                # its answer tags want newlines


@pytest.mark.parametrize("completion, expected", [
    ("Step 1: add. Step 2: carry.", 2 / 3),
    ("First, add. Second, carry. Next, check. Finally, done.", 1.0),
    ("1. add\n2. carry\n- check", 1.0),
    ("just the answer", 0.0),
])
def test_reasoning_steps(completion, expected):
  assert call("reasoning_steps", [completion]) == [pytest.approx(expected)]


def test_language():
  mixed = "<think>hello world 你好</think><answer>2</answer>"
  assert call("language", [mixed]) == [0.5]                     # hello, world | 你, 好
  assert rewards.get("language", target="zh")([ZERO_PROMPT], [mixed]) == [0.5]
  assert call("language", ["<think>café naïve déjà</think>"]) == [1.0]
  assert call("language", ["<think>Это тест</think> ok"]) == [0.0]  # "ok" is not reasoning
  assert call("language", ["中文 in English</think> answer"], prompts=[R1_PROMPT]) == [0.5]
  assert call("language", ["<think>12 + 3 = 15</think>"]) == [0.0]   # no words
  with pytest.raises(ValueError, match="language target"):
    rewards.get("language", target="xx")([ZERO_PROMPT], ["a"])


# ---------------------------------------------------------------------------------------------
# cosine, repetition, soft_overlong
# ---------------------------------------------------------------------------------------------

def test_cosine_hand_computed():
  completions = [r"\boxed{2}"] * 4 + [r"\boxed{3}"] * 4 + [r"\boxed{2}"]
  lengths = [0, 500, 1000, 5000] * 2 + [250]
  answers = ["2"] * 8 + [None]
  scores = call("cosine", completions, answer=answers, completion_lengths=lengths)
  # correct: 1.0 at 0, midpoint 0.75 at max_len/2, 0.5 at max_len and beyond;
  # wrong: -1.0 at 0, -0.75, -0.5, clamped -0.5; no gold: None.
  assert scores[:8] == pytest.approx([1.0, 0.75, 0.5, 0.5, -1.0, -0.75, -0.5, -0.5])
  assert scores[8] is None
  quarter = rewards.get("cosine", max_len=1000)(
      [""], [r"\boxed{2}"], answer=["2"], completion_lengths=[250])
  assert quarter == [pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))]


def test_cosine_counts_characters_by_default():
  completion = r"\boxed{2}"                           # 9 characters
  score = rewards.get("cosine", max_len=9)([""], [completion], answer=["2"])
  assert score == [pytest.approx(0.5)]


@pytest.mark.parametrize("completion, expected", [
    ("a b c a b c", -0.25),                 # trigrams abc bca cab abc: 1 - 3/4
    ("A b C a B c", -0.25),                 # case-insensitive
    ("one two three four", 0.0),
    ("x y", 0.0),                           # fewer words than the n-gram size
    ("w w w w w w", -0.75),                 # 4 trigrams, 1 distinct
])
def test_repetition(completion, expected):
  assert call("repetition", [completion]) == [pytest.approx(expected)]


def test_soft_overlong():
  score = rewards.get("soft_overlong", max_length=100, cache_length=20)
  assert score([""] * 5, ["x"] * 5, completion_lengths=[80, 90, 100, 101, 0]) == [
      0.0, -0.5, -1.0, -1.0, 0.0]
  assert score([""], ["x" * 85]) == [pytest.approx(-0.25)]   # characters by default


# ---------------------------------------------------------------------------------------------
# adversarial completions
# ---------------------------------------------------------------------------------------------

ADVERSARIAL = [
    "a" * 1_000_000,
    r"\boxed{" + "1" * 1_000_000 + "}",
    r"\boxed{" * 100_000,
    r"\frac{" * 10_000,
    r"\boxed{" + r"\frac{" * 10_000 + "}" * 10_001,
    r"\boxed{10^{10^{10}}}",
    "<answer>2**2**2**2**2**2</answer>",
    "<answer>2**2**2**2**2**2**2</answer>",
    r"\boxed{9^{9^{9^{9}}}!}",
    "</think><think></answer><answer>" * 50_000,
    "<think>" * 100_000 + "</think>",
    "\x00\x01\x02\x1b[31m\\boxed{\x00}\x7f" * 1000,
    "\\boxed{３}<answer>\u202e٣</answer>\ud800\U0001F600" * 100,
    "Step 1:" * 200_000,
    "w " * 500_000,
]
BUILTINS = ["accuracy", "format", "language", "tag_count", "reasoning_steps", "cosine",
            "repetition", "soft_overlong"]


def code_payloads(marker):
  """Completions that would create `marker` if any part of them were executed."""
  return [f"<answer>__import__('os').system('touch {marker}')</answer>",
          f"\\boxed{{open('{marker}', 'w')}}",
          f"<answer>exec(\"open('{marker}', 'w')\")</answer>"]


def test_adversarial_completions_are_bounded_and_never_executed(tmp_path):
  marker = tmp_path / "executed"
  start_all = time.monotonic()
  _verify.default_worker().start()   # start-up is outside the per-call bound
  for name in BUILTINS:
    for i, completion in enumerate(ADVERSARIAL + code_payloads(marker)):
      start = time.monotonic()
      scores = call(name, [completion], prompts=[R1_PROMPT], answer=["3"])
      seconds = time.monotonic() - start
      assert seconds < 5.0, (name, i, seconds)
      assert len(scores) == 1
      assert scores[0] is None or math.isfinite(scores[0]), (name, i, scores)
  assert not marker.exists()
  assert time.monotonic() - start_all < 60


# ---------------------------------------------------------------------------------------------
# registry and combine
# ---------------------------------------------------------------------------------------------

def test_registry():
  assert set(BUILTINS) <= set(rewards.names())
  with pytest.raises(KeyError, match="unknown reward 'nope'"):
    rewards.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("accuracy")(lambda prompts, completions, **_: [])

  @rewards.register("test_length", replace=True)
  def length(prompts, completions, scale=1.0, **_):
    return [scale * len(c) for c in completions]

  assert rewards.get("test_length")([""], ["abc"]) == [3.0]
  rewards.register("test_numpy", replace=True)(
      lambda prompts, completions, **_: np.array([0.5, 2.0], np.float32))
  total, per_fn, errors = rewards.combine({"test_numpy": 2.0}, ["", ""], ["a", "b"])
  assert (total, per_fn, errors) == ([1.0, 4.0], {"test_numpy": [0.5, 2.0]}, {"test_numpy": 0})
  assert rewards.get("test_length", scale=0.5)([""], ["abcd"]) == [2.0]


def test_combine_weighted_sum():
  completions = ["<think>a</think><answer>2</answer>", "<think>a</think><answer>3</answer>",
                 "no format", "<think>a</think><answer>5</answer>"]
  total, per_fn, errors = rewards.combine(
      {"accuracy": 1.0, "format": 0.5}, [ZERO_PROMPT] * 4, completions,
      answer=["2", "2", "2", None])
  assert per_fn == {"accuracy": [1.0, 0.0, 0.0, None], "format": [1.0, 1.0, 0.0, 1.0]}
  assert total == [1.5, 0.5, 0.0, 0.5]
  assert errors == {"accuracy": 0, "format": 0}
  with pytest.raises(KeyError, match="unknown reward"):
    rewards.combine({"missing": 1.0}, [""], [""])


def test_combine_isolates_crashing_hanging_and_malformed_rewards(caplog):
  release = threading.Event()

  def crash(prompts, completions, **_):
    raise ZeroDivisionError("boom")

  def hang(prompts, completions, **_):
    release.wait()        # "forever" until the test releases it
    return [1.0] * len(completions)

  rewards.register("test_crash", replace=True)(crash)
  rewards.register("test_hang", timeout_s=0.3, replace=True)(hang)
  rewards.register("test_short", replace=True)(lambda prompts, completions, **_: [1.0])
  rewards.register("test_values", replace=True)(
      lambda prompts, completions, **_: [float("nan"), "2", 3, None])
  weights = {"format": 1.0, "test_crash": 1.0, "test_hang": 1.0, "test_short": 1.0,
             "test_values": 2.0}
  completions = ["<think>a</think>b"] * 4
  try:
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
      total, per_fn, errors = rewards.combine(weights, [ZERO_PROMPT] * 4, completions)
    assert time.monotonic() - start < 2.0
  finally:
    release.set()
  assert errors == {"format": 0, "test_crash": 4, "test_hang": 4, "test_short": 4,
                    "test_values": 2}
  assert per_fn["test_crash"] == per_fn["test_hang"] == per_fn["test_short"] == [None] * 4
  assert per_fn["test_values"] == [None, None, 3.0, None]
  assert total == [1.0, 1.0, 7.0, 1.0]
  assert "'test_crash' failed with ZeroDivisionError" in caplog.text
  assert "'test_hang' failed with TimeoutError" in caplog.text
