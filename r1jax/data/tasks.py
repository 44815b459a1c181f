"""Procedural tasks: built-in arithmetic with a chain-of-thought trace, and reasoning-gym.

A task record is a dict: `question` (str), `reasoning` (str, or None where only the answer is
known), `answer` (str), `difficulty` (int), plus task-specific fields.

Arithmetic trace: one column per digit, least significant first, each written as a small sum,
e.g. 47+385 -> "7+5=12;4+8+1=13;3+1=4", answer "432" (the carry is the tens digit of the column
sum); 385-47 -> "15-7=8;8-4-1=3;3=3", answer "338". Subtraction keeps results non-negative by
putting the larger operand first.

The honest control of the R1 recipe needs problems that the cold-start traces never cover:
`arithmetic_splits` draws "covered" problems (operands of `covered_digits`, `covered_operands`
terms) and "uncovered" ones (longer operands, or chains such as 3+5+8 -> "3+5+8=16", whose
columns have the shape of the carry columns the traces do show); SFT traces exist only for covered
problems, RL prompts carry answers only, and the held-out evaluation holds both buckets. No
problem is in two splits, up to operand order (`problem_key`: 3+5+8 and 8+5+3 are one problem).
"""

from __future__ import annotations

import itertools

import numpy as np

from r1jax.errors import DataError


def _digits(x: int) -> list[int]:
  return [int(c) for c in reversed(str(x))]


def add_trace(*operands: int) -> str:
  """Column sums of a + b (+ c ...), least significant digit first; the carry is the last
  term of a column."""
  ds = [_digits(x) for x in operands]
  steps, carry = [], 0
  for i in range(max(map(len, ds))):
    terms = [d[i] for d in ds if i < len(d)] + ([carry] if carry else [])
    total = sum(terms)
    steps.append("+".join(map(str, terms)) + f"={total}")
    carry = total // 10
  return ";".join(steps)


def sub_trace(a: int, b: int) -> str:
  """Column differences of a - b (a >= b), least significant digit first, borrowing as '1x'."""
  assert a >= b, (a, b)
  da, db = _digits(a), _digits(b)
  steps, borrow = [], 0
  for i, x in enumerate(da):
    y = db[i] if i < len(db) else None
    value = x - (y or 0) - borrow
    top = x + 10 if value < 0 else x
    expr = str(top) + (f"-{y}" if y is not None else "") + ("-1" if borrow else "")
    steps.append(f"{expr}={value % 10}")
    borrow = int(value < 0)
  return ";".join(steps)


def _operand(rng: np.random.Generator, digits: int) -> int:
  low = 0 if digits == 1 else 10**(digits - 1)
  return int(rng.integers(low, 10**digits))


def _problem(a: int, b: int, op: str, more: tuple[int, ...] = ()) -> dict:
  if more:  # a chain of additions a+b+c...
    if op != "+":
      raise ValueError(f"more than two operands are supported for '+' only, not {op!r}")
    terms = (a, b) + tuple(more)
    return dict(question="+".join(map(str, terms)), reasoning=add_trace(*terms),
                answer=str(sum(terms)), difficulty=max(len(str(x)) for x in terms))
  if op == "+":
    answer, reasoning = a + b, add_trace(a, b)
  elif op == "-":
    a, b = max(a, b), min(a, b)
    answer, reasoning = a - b, sub_trace(a, b)
  else:
    raise ValueError(f"unsupported operator {op!r}; expected '+' or '-'")
  return dict(question=f"{a}{op}{b}", reasoning=reasoning, answer=str(answer),
              difficulty=max(len(str(a)), len(str(b))))


def problem_key(question) -> tuple:
  """What makes two arithmetic problems the same problem: the operator and the multiset of
  operands of a sum (3+5+8, 8+5+3 and 5+3+8 are one problem: same operands, same answer), the
  ordered pair of a difference. Splits are disjoint in these keys, not only as strings. A record
  (dict) may carry its key (word problems: the same sum told about other names or objects is
  the same problem)."""
  if isinstance(question, dict):
    if "key" in question:
      return tuple(question["key"])
    question = question["question"]
  if "+" in question:
    return ("+",) + tuple(sorted(int(x) for x in question.split("+")))
  if "-" in question:
    a, b = question.split("-")
    return ("-", int(a), int(b))
  return ("?", question)


def arithmetic_records(n: int, seed: int, min_digits: int = 1, max_digits: int = 3,
                       ops: tuple[str, ...] = ("+",), exclude=frozenset(),
                       operands: int = 2, long_operands: int | None = None) -> list[dict]:
  """`n` distinct problems, each operand with a digit count uniform in [min_digits, max_digits];
  `operands` > 2 makes chains a+b+c... (addition only). `long_operands` caps how many operands
  may have more than min_digits digits (1: 7+45 but not 23+45).

  Deterministic in (n, seed, min_digits, max_digits, ops, exclude, operands); problems whose
  `problem_key` is in `exclude` are never drawn, and no two drawn problems share a key. Raises
  ValueError when the space cannot supply `n` distinct problems.
  """
  if not 1 <= min_digits <= max_digits:
    raise ValueError(f"need 1 <= min_digits={min_digits} <= max_digits={max_digits}")
  if operands < 2:
    raise ValueError(f"need operands >= 2, got {operands}")
  rng = np.random.default_rng(seed)
  seen, records = set(exclude), []
  max_tries = 50 * n + 1000  # Generous: rejection only bites when the space is nearly used up.
  for _ in range(max_tries):
    if len(records) == n:
      break
    op = ops[int(rng.integers(len(ops)))]
    a = _operand(rng, int(rng.integers(min_digits, max_digits + 1)))
    b = _operand(rng, int(rng.integers(min_digits, max_digits + 1)))
    more = tuple(_operand(rng, int(rng.integers(min_digits, max_digits + 1)))
                 for _ in range(operands - 2))
    if long_operands is not None and sum(
        len(str(x)) > min_digits for x in (a, b) + more) > long_operands:
      continue
    record = _problem(a, b, op, more)
    key = problem_key(record["question"])
    if key not in seen:
      seen.add(key)
      records.append(record)
  if len(records) < n:
    raise ValueError(f"only {len(records)} distinct problems of {min_digits}-{max_digits} digits "
                     f"with ops {ops} could be drawn, {n} requested")
  return records


# Buckets with at most this many ordered operand tuples are enumerated (see arithmetic_splits).
_ENUMERATE_LIMIT = 1_000_000


def _bucket_space(digits: tuple[int, int], operands: int, long_operands: int | None,
                  ops: tuple[str, ...]) -> list[tuple] | None:
  """Every problem of a bucket as its `problem_key`, in a fixed order; None when the space is
  too large to list (more than `_ENUMERATE_LIMIT` ordered operand tuples per operator)."""
  lo, hi = digits
  values = range(0 if lo == 1 else 10**(lo - 1), 10**hi)
  if len(values)**operands > _ENUMERATE_LIMIT:
    return None
  keys = []
  for op in ops:
    if op == "-" and operands > 2:
      raise ValueError(f"more than two operands are supported for '+' only, not {op!r}")
    for terms in itertools.combinations_with_replacement(values, operands):  # ascending multisets
      if long_operands is not None and sum(len(str(x)) > lo for x in terms) > long_operands:
        continue
      keys.append(("-", terms[1], terms[0]) if op == "-" else ("+",) + terms)
  return keys


def _reversed(record: dict) -> dict | None:
  """The sum of `record` with its operands in reverse order (7+45 -> 45+7); None when that is
  the same question (5+5, 3+8+3) or the record is not a sum."""
  if "+" not in record["question"]:
    return None
  terms = [int(x) for x in reversed(record["question"].split("+"))]
  flipped = _problem(terms[0], terms[1], "+", tuple(terms[2:]))
  return None if flipped["question"] == record["question"] else flipped


def arithmetic_splits(seed: int, *, n_sft: int, n_rl: int, n_eval: int,
                      covered_digits: tuple[int, int] = (1, 2),
                      uncovered_digits: tuple[int, int] = (3, 3), ops: tuple[str, ...] = ("+",),
                      rl_uncovered_frac: float = 0.5, covered_operands: int = 2,
                      uncovered_operands: int = 2, uncovered_traces: int = 0,
                      covered_long_operands: int | None = None,
                      trace_both_orders: bool = False,
                      n_heldout: int = 0) -> dict[str, list[dict]]:
  """Disjoint splits for the R1 recipe and its control; each record gains `bucket`.

  Returns {"sft": n_sft covered problems with traces (plus `uncovered_traces` traced
           uncovered ones: a kind the cold start sees only a few times),
           "rl": n_rl problems (a `rl_uncovered_frac` share uncovered) with reasoning=None,
           "eval": n_eval covered + n_eval uncovered problems with reasoning=None,
           "heldout": n_heldout more uncovered problems with reasoning=None (only when
           n_heldout > 0)}.

  Every split of a bucket is drawn from the same distribution, so the held-out problems look
  like the training ones. A bucket small enough to list (`_bucket_space`) is listed, shuffled
  once per seed, and dealt out in order: eval, then SFT, then RL; each split is a uniform random
  subset of the bucket's problems (up to operand order), however much of the space the splits use
  up. (Drawing each split by rejection sampling instead made the first split drawn, the eval
  set, take the rare kinds, such as the 55 one-digit sums, that the later splits then lacked.)
  Larger buckets, where the splits use a negligible share, are rejection-sampled with each
  operand's digit count uniform (`arithmetic_records`). The eval set comes first either way, so
  it does not change when the training sizes do. The "heldout" set comes last, after the RL
  prompts, so asking for it changes no other split: a large uncovered test set (50 problems
  cannot tell two stages apart by 0.05; 400 can, to about 0.035).

  `trace_both_orders` adds, for every traced sum a+b+..., the same problem written in reverse
  order (b+a, with its own column trace): the same `problem_key`, so no split gains a problem
  another one has, but the cold start sees each traced problem from both sides.
  """
  buckets = {"covered": (covered_digits, covered_operands, covered_long_operands),
             "uncovered": (uncovered_digits, uncovered_operands, None)}
  taken: set[tuple] = set()
  decks = {}  # bucket -> iterator over its problem keys, shuffled once per seed
  for i, (bucket, (digits, operands, long_operands)) in enumerate(buckets.items()):
    keys = _bucket_space(digits, operands, long_operands, ops)
    if keys is not None:
      order = np.random.default_rng([seed, 10 + i]).permutation(len(keys))
      decks[bucket] = iter([keys[j] for j in order])
  order_rng = np.random.default_rng([seed, 12])  # The order operands are written in.

  def from_deck(n, bucket):
    out = list(itertools.islice((k for k in decks[bucket] if k not in taken), n))
    if len(out) < n:
      raise ValueError(f"the {bucket} bucket has too few problems left: {len(out)} of the {n} "
                       f"requested")
    records = []
    for op, *terms in out:
      if op == "+":
        terms = [int(x) for x in order_rng.permutation(terms)]
      records.append(_problem(terms[0], terms[1], op, tuple(terms[2:])))
    return records

  def draw(n, bucket, stream):
    if bucket in decks:
      records = from_deck(n, bucket)
    else:
      (lo, hi), operands, long_operands = buckets[bucket]
      records = arithmetic_records(n, seed=[seed, stream], min_digits=lo, max_digits=hi,
                                   ops=ops, exclude=taken, operands=operands,
                                   long_operands=long_operands)
    taken.update(problem_key(r["question"]) for r in records)
    return [dict(r, bucket=bucket) for r in records]

  def answers_only(records):
    return [dict(r, reasoning=None) for r in records]

  n_rl_uncovered = round(n_rl * rl_uncovered_frac)
  eval_ = answers_only(draw(n_eval, "covered", 0) + draw(n_eval, "uncovered", 1))
  sft = draw(n_sft, "covered", 2)
  if uncovered_traces:
    sft = sft + draw(uncovered_traces, "uncovered", 6)
  if trace_both_orders:
    flipped = [(_reversed(r), r["bucket"]) for r in sft]
    sft = sft + [dict(f, bucket=bucket) for f, bucket in flipped if f is not None]
  if uncovered_traces or trace_both_orders:
    sft = [sft[i] for i in np.random.default_rng([seed, 7]).permutation(len(sft))]
  rl = answers_only(draw(n_rl - n_rl_uncovered, "covered", 3) +
                    draw(n_rl_uncovered, "uncovered", 4))
  # Interleave covered and uncovered RL prompts so any prefix of the list mixes both.
  order = np.random.default_rng([seed, 5]).permutation(len(rl))
  out = {"sft": sft, "rl": [rl[i] for i in order], "eval": eval_}
  if n_heldout:
    out["heldout"] = answers_only(draw(n_heldout, "uncovered", 8))
  return out


# word problems: (template, operator); {a} and {b} are the operands, the answer a+b or a-b
_WORD_TEMPLATES = (
    ("{name} has {a} {things}. {pronoun} gets {b} more. How many {things} does {name} have now?",
     "+"),
    ("There are {a} {things} in a box and {b} {things} on the table. How many {things} are there "
     "in all?", "+"),
    ("{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read?",
     "+"),
    ("{name} had {a} {things} and gave {b} of them away. How many {things} does {name} have "
     "left?", "-"),
    ("A shelf holds {a} {things}. {b} of them are sold. How many {things} are still on the "
     "shelf?", "-"),
)
_NAMES = (("Sam", "He"), ("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"),
          ("Zoe", "She"))
_THINGS = ("apples", "marbles", "stickers", "books", "coins", "shells")


def word_problem_records(n: int, seed, *, min_digits: int = 1, max_digits: int = 2,
                         exclude=frozenset()) -> list[dict]:
  """`n` one-step arithmetic word problems (sums and differences of two operands, each of
  min..max digits; differences keep the larger operand first). Each record's `key` is its
  arithmetic (`problem_key`): no two share one, and keys in `exclude` are never drawn. The
  answer is the number alone."""
  rng = np.random.default_rng(seed)
  seen, records = set(exclude), []
  for _ in range(50 * n + 1000):
    if len(records) == n:
      break
    template, op = _WORD_TEMPLATES[int(rng.integers(len(_WORD_TEMPLATES)))]
    a = _operand(rng, int(rng.integers(min_digits, max_digits + 1)))
    b = _operand(rng, int(rng.integers(min_digits, max_digits + 1)))
    if op == "-":
      a, b = max(a, b), min(a, b)
    key = problem_key(f"{a}{op}{b}")
    if key in seen:
      continue
    seen.add(key)
    name, pronoun = _NAMES[int(rng.integers(len(_NAMES)))]
    things = _THINGS[int(rng.integers(len(_THINGS)))]
    records.append(dict(question=template.format(name=name, pronoun=pronoun, things=things, a=a,
                                                 b=b),
                        reasoning=None, answer=str(a + b if op == "+" else a - b),
                        difficulty=max(len(str(a)), len(str(b))), key=list(key),
                        bucket="sum" if op == "+" else "difference"))
  if len(records) < n:
    raise ValueError(f"only {len(records)} distinct word problems of {min_digits}-{max_digits} "
                     f"digits could be drawn, {n} requested")
  return records


def word_problem_splits(seed: int, *, n_rl: int, n_eval: int, min_digits: int = 1,
                        max_digits: int = 2) -> dict[str, list[dict]]:
  """R1-Zero's data: RL prompts and held-out problems (answers only, no traces), disjoint in
  their arithmetic (`problem_key`), whatever the wording. The held-out set is drawn first."""
  eval_ = word_problem_records(n_eval, [seed, 10], min_digits=min_digits, max_digits=max_digits)
  rl = word_problem_records(n_rl, [seed, 11], min_digits=min_digits, max_digits=max_digits,
                            exclude={problem_key(r) for r in eval_})
  return {"sft": [], "rl": rl, "eval": eval_}


def reasoning_gym_records(name: str, n: int, seed: int, **task_config) -> list[dict]:
  """`n` problems of the reasoning-gym task `name`; answers are checked by its own verifier.

  Records keep `task` and `metadata` so a reward can call
  `reasoning_gym.get_score_answer_fn(task)(completion_answer, record)`.
  """
  try:
    import reasoning_gym
  except ImportError:
    raise DataError("reasoning_gym is not installed: pip install reasoning-gym") from None
  try:
    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed, **task_config)
  except (KeyError, ValueError, TypeError) as e:
    raise DataError(f"reasoning-gym task {name!r}: {e}") from None
  records = []
  for entry in dataset:
    metadata = dict(entry.get("metadata") or {})
    records.append(dict(question=entry["question"], reasoning=None, answer=str(entry["answer"]),
                        difficulty=metadata.get("difficulty"), task=name, metadata=metadata))
  return records
