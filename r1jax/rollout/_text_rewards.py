"""Rewards that read only the shape of a completion: tags, steps, script, repetition, length.

Plain functions `(prompts, completions, **fields) -> list[float]`; `rewards.py` registers them.
Each looks at no more than MAX_TEXT_CHARS leading characters (or uses C-level `str.count` /
`str.split` on the whole text) with linear-time scans, so a megabyte of adversarial text costs
milliseconds.

Templates: the R1-Zero paper's completion is `<think> ... </think> <answer> ... </answer>`; the
R1 template (and r1jax's templates, see `r1jax/data/template.py`) end the prompt with `<think>`
or `<think>\\n`, so the completion starts inside the think block. Functions that look at tags
take `think_in_prompt` (None = detect from the prompt ending with `<think>`) and then read the
completion as if it began with `<think>\\n`; a completion that itself starts with `<think>` is
read as is.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

# Text statistics read at most this many leading characters: a megabyte completion is degenerate
# anyway, and the cap keeps Python-level loops (word lists, n-grams) bounded.
MAX_TEXT_CHARS = 200_000


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

def per_completion(value, n: int, name: str) -> list:
  """A field as one value per completion: lists must have length n, anything else is broadcast."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"field {name!r} has {len(value)} values for {n} completions")
    return list(value)
  return [value] * n


def text_of(message) -> str:
  """Completion or prompt text; a chat-style list of messages gives its last message's content."""
  if isinstance(message, str):
    return message
  if isinstance(message, (list, tuple)) and message and isinstance(message[-1], Mapping):
    return str(message[-1].get("content", ""))
  raise TypeError(f"expected text or a list of chat messages, got {type(message).__name__}")


def lengths(completions, completion_lengths) -> list[int]:
  """Token lengths from the `completion_lengths` field when given, else character counts."""
  if completion_lengths is None:
    return [len(text_of(c)) for c in completions]
  return [int(n) for n in per_completion(completion_lengths, len(completions),
                                         "completion_lengths")]


def _thinks_in_prompt(prompt, think_in_prompt: bool | None) -> bool:
  """Whether the prompt already opened the think block (R1 template), by flag or detection."""
  if think_in_prompt is not None:
    return think_in_prompt
  return isinstance(prompt, str) and prompt.rstrip().endswith("<think>")


def _with_think_open(prompt, completion: str, think_in_prompt: bool | None) -> str:
  """The completion as if it began with the `<think>\\n` that an R1 prompt supplies."""
  if _thinks_in_prompt(prompt, think_in_prompt) and not completion.lstrip().startswith("<think>"):
    return "<think>\n" + completion
  return completion


def _texts(prompts, completions, think_in_prompt, cap: int | None = None) -> list[str]:
  """Each completion (first `cap` characters) read as if the think block opened in it."""
  prompts = per_completion(prompts, len(completions), "prompts")
  return [_with_think_open(p, text_of(c)[:cap], think_in_prompt)
          for p, c in zip(prompts, completions)]


def _reasoning(text: str) -> str:
  """The think block's content (all text up to `</think>` when it is not closed)."""
  text = text.lstrip()
  if text.startswith("<think>"):
    text = text[len("<think>"):]
  end = text.find("</think>")
  return text if end < 0 else text[:end]


# ---------------------------------------------------------------------------------------------
# format, tag_count, reasoning_steps, language
# ---------------------------------------------------------------------------------------------

def format_reward(prompts, completions, think_in_prompt: bool | None = None, **_
                  ) -> list[float]:
  """1.0 for `<think>reasoning</think>` then an answer, else 0.0.

  After `</think>` there must be either one `<answer>...</answer>` block and nothing after it
  (R1-Zero template), or, without answer tags, any non-empty text (R1 template). Exactly one
  pair of think tags; reasoning and answer must be non-empty.
  """
  return [_format_one(t) for t in _texts(prompts, completions, think_in_prompt)]


def _format_one(text: str) -> float:
  text = text.strip()
  if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
    return 0.0
  reasoning, rest = text[len("<think>"):].split("</think>")
  rest = rest.strip()
  if not reasoning.strip() or not rest:
    return 0.0
  if "<answer>" not in rest and "</answer>" not in rest:
    return 1.0
  if rest.count("<answer>") != 1 or rest.count("</answer>") != 1:
    return 0.0
  if not (rest.startswith("<answer>") and rest.endswith("</answer>")):
    return 0.0
  return 1.0 if rest[len("<answer>"):-len("</answer>")].strip() else 0.0


# open-r1 counts these exact strings; r1jax's templates write `<answer>x</answer>` on one line,
# so the default counts the bare tags and OPEN_R1_TAGS is there to reproduce open-r1.
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
OPEN_R1_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def tag_count(prompts, completions, think_in_prompt: bool | None = None,
              tags: Sequence[str] = TAGS, **_) -> list[float]:
  """Share of `tags` that occur exactly once (0.25 per tag for four tags, as in open-r1).

  With an R1-style prompt the opening think tag comes from the prompt and counts as present
  unless the completion opens another. `tags=OPEN_R1_TAGS` gives open-r1's exact reward.
  """
  texts = _texts(prompts, completions, think_in_prompt, MAX_TEXT_CHARS)
  return [sum(t.count(tag) == 1 for tag in tags) / len(tags) for t in texts]


_STEP_MARKERS = re.compile(r"Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,",
                           re.MULTILINE)


def reasoning_steps(prompts, completions, **_) -> list[float]:
  """min(1, number of step markers / 3), with open-r1's markers ("Step 1:", "1.", bullets,
  "First,", "Second,", "Next,", "Finally,")."""
  return [min(1.0, len(_STEP_MARKERS.findall(text_of(c)[:MAX_TEXT_CHARS])) / 3)
          for c in completions]


# Word tokens: a run of Latin letters is one word; any other letter is a word by itself, since
# scripts such as Chinese do not separate words by spaces.
_WORDS = re.compile(r"[A-Za-z\u00C0-\u024F]+|[^\W\d_]")
_SCRIPTS = {
    "en": lambda w: w[0] <= "\u024F",                  # Basic Latin .. Latin Extended-B
    "zh": lambda w: "\u4E00" <= w[0] <= "\u9FFF",      # CJK Unified Ideographs
}


def language(prompts, completions, target: str = "en", think_in_prompt: bool | None = None,
             **_) -> list[float]:
  """Share of the reasoning's word tokens written in the target language's script.

  A heuristic stand-in for R1's language-consistency reward (share of target-language words):
  "en" counts Latin-script words, "zh" CJK characters. Reasoning is the think block (or the
  whole completion without think tags). No words at all scores 0.0.
  """
  if target not in _SCRIPTS:
    raise ValueError(f"language target {target!r} not in {sorted(_SCRIPTS)}")
  in_target = _SCRIPTS[target]
  scores = []
  for text in _texts(prompts, completions, think_in_prompt, MAX_TEXT_CHARS):
    words = _WORDS.findall(_reasoning(text))
    scores.append(sum(map(in_target, words)) / len(words) if words else 0.0)
  return scores


# ---------------------------------------------------------------------------------------------
# repetition, soft_overlong
# ---------------------------------------------------------------------------------------------

def repetition(prompts, completions, ngram_size: int = 3, max_penalty: float = -1.0, **_
               ) -> list[float]:
  """max_penalty * (1 - distinct / total word n-grams); 0.0 below ngram_size words (open-r1).

  Words are whitespace-separated and lower-cased.
  """
  scores = []
  for c in completions:
    words = text_of(c)[:MAX_TEXT_CHARS].lower().split()
    if len(words) < ngram_size:
      scores.append(0.0)
      continue
    ngrams = list(zip(*(words[i:] for i in range(ngram_size))))
    scores.append(max_penalty * (1.0 - len(set(ngrams)) / len(ngrams)))
  return scores


def soft_overlong(prompts, completions, completion_lengths=None, max_length: int = 16384,
                  cache_length: int = 4096, **_) -> list[float]:
  """DAPO's soft overlong punishment: 0 up to L - L_cache, linear to -1 at L, -1 beyond.

  L = max_length, L_cache = cache_length (open-r1 defaults 16384 / 4096). Length in tokens
  from `completion_lengths` if given, else in characters.
  """
  start = max_length - cache_length
  scores = []
  for length in lengths(completions, completion_lengths):
    if length <= start:
      scores.append(0.0)
    elif length <= max_length:
      scores.append((start - length) / cache_length)
    else:
      scores.append(-1.0)
  return scores
