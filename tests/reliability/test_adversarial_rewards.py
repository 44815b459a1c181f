"""Every registered reward on adversarial completions: each call returns within its time bound, a
list of float | None with one score per completion, and nothing in a completion is executed.

Bounds: the text rewards scan a capped prefix in linear time (a megabyte costs milliseconds; the
bound asserted is TEXT_BOUND_S). `accuracy` (and `cosine`, which calls it) hand at most one
comparison per completion to the math-verify child process, which is killed past
`_verify.DEFAULT_TIMEOUT_S`: a call on one completion returns within that plus SLACK_S. The child
is warmed up before each timed call, since the bound covers the comparison, not a fresh child's
import after a kill. Latencies are measured and the worst is printed (pytest -s).
"""

import math
import os
import threading
import time
import uuid

import pytest

from r1jax.rollout import _verify, rewards
from testing import in_thread

R1_PROMPT = "<｜User｜>What is 1+2?<｜Assistant｜><think>\n"
ZERO_PROMPT = "User: What is 1+2? Assistant:"
GOLD = "3"
MB = 1_000_000
TEXT_BOUND_S = 2.0
SLACK_S = 2.0
VERIFY_BOUND_S = _verify.DEFAULT_TIMEOUT_S + SLACK_S
# Registered at collection time: the built-ins (tests elsewhere register throwaway ones later).
REGISTERED = rewards.names()
# A marker file any executed payload would create; unique per test session.
MARKER = f"/tmp/PWNED_{uuid.uuid4().hex}"


def payloads(marker):
  """Completions that would create `marker` if any part of them were evaluated as Python."""
  code = f"__import__('os').system('touch {marker}')"
  return {
      "eval payload in an answer tag": f"<think>x</think><answer>{code}</answer>",
      "eval payload in a box": f"\\boxed{{{code}}}",
      "eval payload as math": f"<answer>$({code}) + 1$</answer>",
      "exec payload": f"<answer>exec(\"open('{marker}', 'w').write('x')\")</answer>",
      "lambda payload": f"\\boxed{{(lambda: {code})()}}",
      "sympify-style payload": f"<answer>Symbol('x').__class__.__init__.__globals__"
                               f"['__builtins__']['__import__']('os').system('touch {marker}')"
                               "</answer>",
  }


ADVERSARIAL = {
    "1 MB of text": "a" * MB,
    "1 MB answer": f"<answer>{'7' * MB}</answer>",
    "1 MB box": "\\boxed{" + "1" * MB + "}",
    "1 MB of words and steps": "Step 1: so " * (MB // 11),
    "1 MB unclosed boxes": "\\boxed{" * (MB // 7),
    "nested frac x5000": "\\frac{" * 5000,
    "nested frac x5000, balanced, boxed": "\\boxed{" + "\\frac{1}{" * 5000 + "2" + "}" * 5001,
    "nested frac x20, boxed (under the depth cap)": "\\boxed{" + "\\frac{1}{" * 20 + "2" + "}" * 21,
    "10^{10^{10}} boxed": "\\boxed{10^{10^{10}}}",
    "9^{9^{9^{9}}} in answer tags": "<think>big</think><answer>9^{9^{9^{9}}}</answer>",
    "power tower": "<answer>2**2**2**2**2**2**2</answer>",
    "huge exponent float": "<answer>1e999999999</answer>",
    "huge integer": "<answer>" + "9" * 5000 + "</answer>",
    "unbalanced think": "<think>" * 50_000 + "</think>" + "<answer>3",
    "unbalanced answer": "</answer><answer>" * 50_000,
    "interleaved tags": "</think><think></answer><answer>" * 30_000,
    "only closing tags": "</think></answer>" * 10_000 + "3",
    "control chars and NULs": "\x00\x01\x02\x1b[31m\\boxed{\x00 3 \x00}\x7f\x0c\r\x85" * 1000,
    "NUL inside answer": "<think>\x00</think><answer>3\x00</answer>",
    "lone surrogates": "<think>\ud800\udfff</think><answer>\udc00 3 \ud83d</answer>",
    "odd unicode": "<think>\u202e\u200b\ufeff\U0001F600 ３</think><answer>٣</answer>\uffff",
    "combining marks": "<answer>3" + "\u0301" * 100_000 + "</answer>",
    "empty": "",
    "whitespace": " \n\t" * 100_000,
    "backslashes": "\\" * MB,
    "braces": "{" * (MB // 2) + "}" * (MB // 2),
    "dollar soup": "$" * 10_000 + "\\boxed{4}",
    **payloads(MARKER),
}
# Cases with a 1 MB (or huge) gold answer, scored against a plain completion.
ADVERSARIAL_GOLDS = {
    "9^{9^{9^{9}}} as gold": "9^{9^{9^{9}}}",
    "1 MB gold": "5" * MB,
    "nested gold": "\\frac{" * 5000,
    "eval payload as gold": f"__import__('os').system('touch {MARKER}')",
}
LATENCIES: dict[str, float] = {}


def bound(name):
  return VERIFY_BOUND_S if name in ("accuracy", "cosine") else TEXT_BOUND_S


def timed(name, fn, prompts, completions, **fields):
  """fn's scores and seconds, checked for type and length; the worker is warm beforehand."""
  _verify.default_worker().start()
  start = time.monotonic()
  scores = fn(prompts, completions, **fields)
  seconds = time.monotonic() - start
  assert isinstance(scores, list) and len(scores) == len(completions), (name, scores)
  for s in scores:
    assert s is None or (isinstance(s, float) and math.isfinite(s)), (name, s)
  LATENCIES[name] = max(LATENCIES.get(name, 0.0), seconds)
  return scores, seconds


@pytest.fixture(scope="module", autouse=True)
def nothing_executed():
  yield
  executed = os.path.exists(MARKER)
  if executed:
    os.unlink(MARKER)
  assert not executed, "a completion's payload was executed"
  worst = {}
  for key, seconds in LATENCIES.items():
    name = key.split(":")[0].split(",")[0].split(" ")[0]
    if seconds >= worst.get(name, ("", 0.0))[1]:
      worst[name] = (key, seconds)
  print(f"\nadversarial_rewards: {len(LATENCIES)} timed calls (bounds: text {TEXT_BOUND_S} s, "
        f"math-verify {VERIFY_BOUND_S} s); verify worker restarts "
        f"{_verify.default_worker().restarts}; slowest per reward:")
  for name, (key, seconds) in sorted(worst.items()):
    print(f"  {seconds:6.3f} s  {key}")


def test_every_builtin_is_covered():
  assert {"accuracy", "format", "language", "tag_count", "reasoning_steps", "cosine",
          "repetition", "soft_overlong"} <= set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_adversarial_completions(name):
  fn = rewards.get(name)
  if name == "accuracy":  # every comparison reaches the worker (cosine then reuses them)
    _verify.is_equivalent.cache_clear()
  for prompt in (R1_PROMPT, ZERO_PROMPT):
    for case, completion in ADVERSARIAL.items():
      _, seconds = timed(f"{name}: {case}", fn, [prompt], [completion], answer=[GOLD])
      assert seconds < bound(name), (name, case, seconds)
  # all at once, with per-completion fields (lengths too)
  completions = list(ADVERSARIAL.values())
  n = len(completions)
  scores, seconds = timed(f"{name}: batch of {n}", fn, [R1_PROMPT] * n, completions,
                          answer=[GOLD] * n, completion_lengths=[len(c) for c in completions])
  if name not in ("accuracy", "cosine"):
    assert seconds < TEXT_BOUND_S, (name, seconds)
  else:  # every comparison was cached by the calls above
    assert seconds < VERIFY_BOUND_S, (name, seconds)
  if name == "accuracy":  # none of the huge or nested answers passes for the gold
    for case in ("1 MB answer", "1 MB box", "10^{10^{10}} boxed", "power tower", "huge integer",
                 "9^{9^{9^{9}}} in answer tags", "nested frac x5000, balanced, boxed"):
      assert scores[completions.index(ADVERSARIAL[case])] == 0.0, case


@pytest.mark.parametrize("name", REGISTERED)
def test_adversarial_gold_answers(name):
  fn = rewards.get(name)
  for case, gold in ADVERSARIAL_GOLDS.items():
    for completion in ("\\boxed{3}", "<answer>x</answer>"):
      scores, seconds = timed(f"{name}: {case}", fn, [ZERO_PROMPT], [completion], answer=[gold])
      assert seconds < bound(name), (name, case, seconds)


def test_combine_over_every_reward_counts_no_errors():
  """GRPO's path: the weighted sum over all registered rewards on the adversarial batch; no
  reward raises, none returns a bad value, and every total is finite."""
  completions = list(ADVERSARIAL.values())
  n = len(completions)
  start = time.monotonic()
  total, per_fn, errors = rewards.combine({name: 1.0 for name in REGISTERED}, [R1_PROMPT] * n,
                                          completions, answer=[GOLD] * n)
  LATENCIES[f"combine of {len(REGISTERED)} rewards over {n}"] = time.monotonic() - start
  assert errors == {name: 0 for name in REGISTERED}
  assert len(total) == n and all(math.isfinite(t) for t in total)
  assert all(len(scores) == n for scores in per_fn.values())


def test_accuracy_is_bounded_off_the_main_thread_and_under_contention():
  """math-verify's own alarms work only on the main thread; the worker process's bound must hold
  from any thread: with two threads asking at once (calls are serialized, so the second may
  wait for the first), and when the bound is shorter than the comparison, which kills the child
  (a comparison math-verify's alarms cannot stop is bounded the same way)."""
  fn = rewards.get("accuracy")
  worker = _verify.default_worker()
  worker.start()
  slow = ["\\boxed{9^{9^{9^{8}}}}", "<answer>10^{10^{11}}</answer>"]  # not cached yet
  results = {}

  def work(i):
    start = time.monotonic()
    results[i] = (fn([ZERO_PROMPT], [slow[i]], answer=[GOLD]), time.monotonic() - start)

  threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(4 * VERIFY_BOUND_S)
  assert not any(t.is_alive() for t in threads), "a reward call hung off the main thread"
  for i in range(2):
    scores, seconds = results[i]
    assert scores == [0.0]
    assert seconds < 2 * VERIFY_BOUND_S, (i, seconds)
    LATENCIES[f"accuracy, 2 threads at once, thread {i}"] = seconds

  # a 0.5 s bound on a ~1.5 s comparison: the child is killed, the score is 0.0, in time
  restarts = worker.restarts
  short = rewards.get("accuracy", timeout_s=0.5)
  scores, seconds = in_thread(lambda: short([ZERO_PROMPT], ["\\boxed{10^{10^{8}}}"],
                                            answer=[GOLD]), 30)
  assert scores == [0.0] and seconds < 0.5 + SLACK_S, (scores, seconds)
  assert worker.restarts == restarts + 1
  LATENCIES["accuracy with timeout_s=0.5, killed, off-main thread"] = seconds

  # and the fresh child answers correctly, from a thread
  worker.start()
  scores, _ = in_thread(lambda: fn(["", ""], ["\\boxed{1+2}", "\\boxed{1+2x}"],
                                   answer=["3", "2x+1"]), VERIFY_BOUND_S + 30)
  assert scores == [1.0, 1.0]
