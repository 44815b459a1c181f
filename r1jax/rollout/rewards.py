"""Rule-based rewards for GRPO and rejection sampling, a registry of them, and their weighted sum.

```python
from r1jax.rollout import rewards
fn = rewards.get("accuracy")                       # or get("cosine", max_len=512) to set parameters
scores = fn(prompts, completions, answer=answers)  # list[float | None], one per completion
rewards.register("name")(fn)                       # fn(prompts, completions, **fields)
total, per_fn, errors = rewards.combine({"accuracy": 1.0, "format": 0.5},
                                        prompts, completions, answer=answers)
```

Fields (`answer=`, `task=`, `completion_lengths=`, ...) are per-completion lists (a single
non-list value is broadcast). Every function accepts and ignores fields it does not use.

Built-ins (names as registered):
  accuracy         1/0 by the final answer (see `_verify.py`); None without a gold answer.
  format           1 if reasoning sits in `<think>...</think>` followed by an answer.
  language         share of target-language words in the reasoning (R1's consistency reward).
  tag_count        0.25 per tag that occurs exactly once (open-r1).
  reasoning_steps  min(1, step markers / 3) (open-r1).
  cosine           length-scaled correctness (open-r1 / "Demystifying long CoT").
  repetition       -(share of repeated word n-grams) (open-r1).
  soft_overlong    DAPO's soft overlong punishment.
Model-scored (in `known()`, not in the registry's `names()`):
  reward_model     a reward model's score (`r1jax.rollout.reward_model`): a GRPO stage binds the
                   model its `reward_model` field names for its run (`bind`).

Templates: tag-reading rewards accept completions that open `<think>` themselves (R1-Zero) or
continue a prompt that ends with `<think>` (R1); see `_text_rewards.py`.

Bounds: nothing from a completion is executed. Text statistics use linear-time scans over a
capped prefix (`_text_rewards.MAX_TEXT_CHARS`); answers are searched in the last 10k characters
and checked by math-verify in a killable child process (see `_verify.py`), so every built-in
returns within a bound on any input. `combine` runs registered non-built-in functions in a helper
thread with a per-function timeout (set at registration); a function that raises, hangs or
returns garbage scores None for the affected completions, contributes 0 to the total, is logged
and counted, and never raises into the caller. Python cannot kill a thread: a hung function's
thread keeps running in the background (daemon); a function that can hang in C code while holding
the GIL should bound itself with a process, as `accuracy` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import threading
from typing import Any, Callable, Mapping, Sequence

from r1jax.rollout import _text_rewards, _verify
from r1jax.rollout._text_rewards import OPEN_R1_TAGS, TAGS, per_completion, text_of  # noqa: F401

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]

# Default time bound for registered (non-built-in) functions inside `combine`.
DEFAULT_TIMEOUT_S = 30.0
# Rewards a model scores: a stage binds the model (`bind`) for its run. They run inline and
# their errors propagate: the model's forward is a collective on every process, and a failure
# must stop the run on all of them rather than leave some with scores and some without.
MODEL_REWARDS = ("reward_model",)
_BOUND: dict[str, RewardFn] = {}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: RewardFn
  timeout_s: float | None   # None: run inline (built-ins are bounded by construction)


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S, replace: bool = False):
  """Decorator registering `fn(prompts, completions, **fields) -> list[float | None]` as `name`.

  `timeout_s` bounds one call inside `combine` (None: run inline, no bound). Registering an
  existing name raises unless `replace=True`.
  """
  def decorator(fn: RewardFn) -> RewardFn:
    if not callable(fn):
      raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    if name in MODEL_REWARDS:
      raise ValueError(f"reward {name!r} is scored by a model (`bind`); pick another name")
    if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
      raise ValueError(f"reward {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = _Entry(fn, timeout_s)
    return fn
  return decorator


def get(name: str, **params) -> RewardFn:
  """The reward function registered as `name`, with keyword `params` bound if given."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown reward {name!r}; registered: {', '.join(names())}")
  fn = _REGISTRY[name].fn
  return functools.partial(fn, **params) if params else fn


def names() -> list[str]:
  """Registered (rule) reward names, sorted. `known()` adds the model-scored ones."""
  return sorted(_REGISTRY)


def known() -> list[str]:
  """Every reward a stage may name: the registered ones and the model-scored ones, sorted."""
  return sorted(set(_REGISTRY) | set(MODEL_REWARDS))


@contextlib.contextmanager
def bind(name: str, fn: RewardFn):
  """Within the block, the model-scored reward `name` (`MODEL_REWARDS`) is `fn(prompts,
  completions, **fields) -> scores`."""
  if name not in MODEL_REWARDS:
    raise KeyError(f"{name!r} is not a model-scored reward ({', '.join(MODEL_REWARDS)})")
  previous = _BOUND.get(name)
  _BOUND[name] = fn
  try:
    yield fn
  finally:
    if previous is None:
      _BOUND.pop(name, None)
    else:
      _BOUND[name] = previous


# ---------------------------------------------------------------------------------------------
# Weighted sum with failure isolation
# ---------------------------------------------------------------------------------------------

def combine(weights: Mapping[str, float], prompts: Sequence, completions: Sequence, **fields
            ) -> tuple[list[float], dict[str, list[float | None]], dict[str, int]]:
  """Weighted sum of rewards: (total per completion, scores per function, errors per function).

  `errors[name]` counts the completions whose score is missing because the function raised,
  timed out, returned the wrong number of scores, or returned a non-finite or non-numeric
  value; those scores are None in `per_fn` and add 0 to `total`. A None returned on purpose
  (e.g. accuracy without a gold answer) also adds 0 but is not an error.
  """
  unknown = [name for name in weights if name not in known()]
  if unknown:
    raise KeyError(f"unknown reward(s) {unknown}; known: {', '.join(known())}")
  n = len(completions)
  total = [0.0] * n
  per_fn: dict[str, list[float | None]] = {}
  errors: dict[str, int] = {}
  for name, weight in weights.items():
    if name in MODEL_REWARDS:
      scores, errors[name] = _model_scores(name, prompts, completions, fields), 0
    else:
      scores, errors[name] = _scores_or_none(name, prompts, completions, fields)
    per_fn[name] = scores
    for i, score in enumerate(scores):
      if score is not None:
        total[i] += float(weight) * score
  return total, per_fn, errors


def _model_scores(name: str, prompts, completions, fields) -> list[float]:
  """The bound model's scores, unguarded (see MODEL_REWARDS)."""
  if name not in _BOUND:
    raise RuntimeError(f"reward {name!r} is scored by a model, and none is bound (a GRPO "
                       "stage binds the one its `reward_model` field names)")
  scores = [float(v) for v in _BOUND[name](prompts, completions, **fields)]
  if len(scores) != len(completions) or not all(map(math.isfinite, scores)):
    raise RuntimeError(f"reward {name!r}: the model returned {len(scores)} scores for "
                       f"{len(completions)} completions, or a non-finite one")
  return scores


def _scores_or_none(name: str, prompts, completions, fields) -> tuple[list[float | None], int]:
  """Calls one registered function under its bound; returns its checked scores and error count."""
  n = len(completions)
  entry = _REGISTRY[name]
  try:
    raw = _call_bounded(name, entry, prompts, completions, fields)
  except Exception as e:  # the run must survive any reward bug
    log.warning("reward %r failed with %s: %s", name, type(e).__name__, _short(e))
    return [None] * n, n
# Any sized iterable of scores will do (a list, a tuple, a numpy array).
  if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__len__") or len(raw) != n:
    log.warning("reward %r returned %s instead of %d scores", name, _describe(raw), n)
    return [None] * n, n
  scores, bad = [], 0
  for value in list(raw):
    if value is None:
      scores.append(None)
    elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
      scores.append(float(value))
    else:
      scores.append(None)
      bad += 1
  if bad:
    log.warning("reward %r returned %d non-finite or non-numeric score(s)", name, bad)
  return scores, bad


def _call_bounded(name: str, entry: _Entry, prompts, completions, fields):
  """Runs entry.fn inline, or in a daemon thread when it has a timeout (TimeoutError past it)."""
  if entry.timeout_s is None:
    return entry.fn(prompts, completions, **fields)
  box: dict[str, Any] = {}

  def target():
    try:
      box["value"] = entry.fn(prompts, completions, **fields)
    except BaseException as e:  # reported to the caller's thread below
      box["error"] = e

  thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
  thread.start()
  thread.join(entry.timeout_s)
  if thread.is_alive():
    raise TimeoutError(f"no result within {entry.timeout_s} s (thread left running)")
  if "error" in box:
    raise box["error"]
  return box["value"]


def _short(e: BaseException) -> str:
  text = str(e)
  return text if len(text) <= 200 else text[:200] + "..."


def _describe(value) -> str:
  if hasattr(value, "__len__") and not isinstance(value, (str, bytes, Mapping)):
    return f"{len(value)} values"
  return type(value).__name__


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------

@register("accuracy", timeout_s=None)
def accuracy(prompts, completions, answer=None, task=None, entry=None,
             timeout_s: float = _verify.DEFAULT_TIMEOUT_S, **_) -> list[float | None]:
  """1.0 if the completion's final answer equals the gold `answer`, 0.0 if not, None if no gold.

  The final answer is the last balanced `\\boxed{...}`, else the last `<answer>...</answer>`.
  Equality: exact for plain numbers, else math-verify `verify(parse(gold), parse(pred))` in a
  child process bounded by `timeout_s` per comparison (timeouts score 0.0).
  Reasoning-gym: a `task` that has `score_answer(answer, entry)` (a dataset object), or a
  dataset name in `task` or in `entry["metadata"]["source_dataset"]`, is scored by that
  dataset's verifier when reasoning_gym is installed (else by the gold answer as above).
  """
  n = len(completions)
  golds = per_completion(answer, n, "answer")
  tasks = per_completion(task, n, "task")
  entries = per_completion(entry, n, "entry")
  return [_accuracy_one(text_of(c), g, t, e, timeout_s)
          for c, g, t, e in zip(completions, golds, tasks, entries)]


def _accuracy_one(completion: str, gold, task, entry, timeout_s: float) -> float | None:
  scorer = _task_scorer(task, entry)
  if scorer is not None:
    if not isinstance(entry, Mapping):
      entry = {"answer": gold, "metadata": {}}
    return float(scorer(_verify.extract_answer(completion), entry))
  if gold is None and isinstance(entry, Mapping):
    gold = entry.get("answer")
  if gold is None:
    return None
  pred = _verify.extract_answer(completion)
  if pred is None:
    return 0.0
  gold = str(gold)
  gold = (_verify.last_boxed(gold) or gold).strip()
  return 1.0 if _verify.is_equivalent(gold, pred, timeout_s) else 0.0


def _task_scorer(task, entry) -> Callable | None:
  """`score_answer(answer, entry)` for a reasoning-gym task, or None to use the gold answer."""
  if callable(getattr(task, "score_answer", None)):
    return task.score_answer
  name = task if isinstance(task, str) else None
  if name is None and isinstance(entry, Mapping):
    metadata = entry.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("source_dataset"), str):
      name = metadata["source_dataset"]
  return None if name is None else _reasoning_gym_scorer(name)


@functools.lru_cache(maxsize=None)
def _reasoning_gym_scorer(name: str) -> Callable | None:
  """The named reasoning-gym dataset's `score_answer`, or None if the package is missing."""
  try:
    import reasoning_gym
  except ImportError:
    return None
  factory = getattr(reasoning_gym, "factory", None)
  if hasattr(factory, "get_score_answer_fn"):
    return factory.get_score_answer_fn(name)
  return reasoning_gym.create_dataset(name, size=1, seed=0).score_answer


# ---------------------------------------------------------------------------------------------
# cosine, and the shape rewards from _text_rewards
# ---------------------------------------------------------------------------------------------

@register("cosine", timeout_s=None)
def cosine(prompts, completions, answer=None, task=None, entry=None, completion_lengths=None,
           min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
           min_value_correct: float = 0.5, max_value_correct: float = 1.0,
           max_len: int = 1000, **_) -> list[float | None]:
  """Correctness scaled by length along a half cosine (defaults of open-r1's reward function).

  Correct: max_value_correct at length 0 down to min_value_correct at max_len (short and right
  is best). Wrong: min_value_wrong at length 0 up to max_value_wrong at max_len (a long wrong
  attempt is punished less than a short one). Lengths past max_len count as max_len. Length in
  tokens from `completion_lengths` if given, else in characters. None where accuracy is None.
  """
  correct = accuracy(prompts, completions, answer=answer, task=task, entry=entry)
  scores = []
  for ok, length in zip(correct, _text_rewards.lengths(completions, completion_lengths)):
    if ok is None:
      scores.append(None)
      continue
    at_zero, at_max = ((max_value_correct, min_value_correct) if ok >= 1.0
                       else (min_value_wrong, max_value_wrong))
    progress = min(length / max_len, 1.0)
    scores.append(at_max + 0.5 * (at_zero - at_max) * (1.0 + math.cos(math.pi * progress)))
  return scores


# Linear-time text scans: bounded by construction, so they run inline in `combine`.
for _name, _fn in [("format", _text_rewards.format_reward),
                   ("tag_count", _text_rewards.tag_count),
                   ("reasoning_steps", _text_rewards.reasoning_steps),
                   ("language", _text_rewards.language),
                   ("repetition", _text_rewards.repetition),
                   ("soft_overlong", _text_rewards.soft_overlong)]:
  register(_name, timeout_s=None)(_fn)
