"""The R1 chat template: the prompt opens the assistant turn with `<think>\\n`.

Templates (all text; the tokenizer turns each marker into one token where its vocab has it):
  "r1":            {bos}{user}{question}{assistant}<think>\\n            (DeepSeek-R1 chat format)
  "r1_zero":       {bos}A conversation between User and Assistant. ... User: {question}.
                   Assistant: <think>                                 (the R1-Zero paper prompt)
  "r1_zero_short": {bos}User: {question}. Reply <think> </think> <answer> </answer>.
                   Assistant: <think>
  "r1_zero_chat":  {bos}{user}<R1-Zero instruction>\n{question}{assistant}<think>
                   (the R1-Zero instruction in a chat model's user turn, e.g. SmolLM2-Instruct)
"r1_zero_short" keeps the R1-Zero shape (instruction, plain-text roles, tags named in the prompt)
in ~40 char-tokens instead of ~400, so a 3-digit arithmetic example stays under ~96 tokens with
the char tokenizer.

A completion is `{reasoning}\\n</think>\\n<answer>{answer}</answer>{eos}` for every template.
"""

from __future__ import annotations

from typing import Mapping

from r1jax.data.tokenizer import CHAR_MARKERS, ChatMarkers
from r1jax.errors import DataError

R1_ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. ")

TEMPLATES = ("r1", "r1_zero", "r1_zero_short", "r1_zero_chat")


def format_prompt(question: str, template: str = "r1", markers: ChatMarkers = CHAR_MARKERS) -> str:
  """The prompt text, ending where the model starts to think."""
  if template == "r1":
    return f"{markers.bos}{markers.user}{question}{markers.assistant}<think>\n"
  if template == "r1_zero":
    return f"{markers.bos}{R1_ZERO_INSTRUCTION}User: {question}. Assistant: <think>"
  if template == "r1_zero_chat":  # R1-Zero's instruction as the user turn of a chat model
    return (f"{markers.bos}{markers.user}{R1_ZERO_INSTRUCTION}\n{question}{markers.assistant}"
            "<think>")
  if template == "r1_zero_short":
    return (f"{markers.bos}User: {question}. Reply <think> </think> <answer> </answer>. "
            "Assistant: <think>")
  raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def format_completion(reasoning: str, answer: str, markers: ChatMarkers = CHAR_MARKERS) -> str:
  """What the model should write after the prompt: reasoning, closed think, answer, eos."""
  return f"{reasoning}\n</think>\n<answer>{answer}</answer>{markers.eos}"


def completion_text(record: Mapping, markers: ChatMarkers = CHAR_MARKERS) -> str:
  """The SFT target of a record: its "completion" field, or one built from reasoning + answer.

  A given completion may come from outside (rejection sampling, HF datasets) and often starts
  with its own `<think>`; the prompt already opened that block, so a leading one is dropped.
  eos is appended when missing so that every SFT example teaches the model to stop.
  """
  completion = record.get("completion")
  if completion is None:
    if record.get("reasoning") is None or record.get("answer") is None:
      raise DataError(f"record for question {str(record.get('question'))[:40]!r} has neither a "
                      "completion nor reasoning + answer, so it cannot be an SFT example")
    return format_completion(record["reasoning"], str(record["answer"]), markers)
  if completion.startswith("<think>"):
    completion = completion[len("<think>"):].lstrip("\n")
  if not completion.endswith(markers.eos):
    completion += markers.eos
  return completion
