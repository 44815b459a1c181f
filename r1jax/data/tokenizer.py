"""Tokenizers behind one small interface: a built-in character tokenizer and HF `tokenizer.json`.

Both expose `encode(text) -> list[int]`, `decode(ids, skip_special=False) -> str`, `vocab_size`,
`pad_id`, `eos_id`, `bos_id`, `special` (special-token text -> id) and `markers` (the strings the
chat template writes for bos/eos/user/assistant, so the template never hard-codes a vocabulary).
`encode` adds nothing on its own: bos and eos come from the template as text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Protocol, Sequence

from r1jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class ChatMarkers:
  """Text of the markers the chat template writes; each maps to one token where the vocab has it."""
  bos: str
  eos: str
  user: str
  assistant: str


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None
  special: dict[str, int]
  markers: ChatMarkers

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...


def _control_ids(tok: Tokenizer) -> set[int]:
  # `skip_special` drops only pad/bos/eos, for both tokenizers: think/answer tags must survive
  # decoding because the rewards read them.
  return {i for i in (tok.pad_id, tok.bos_id, tok.eos_id) if i is not None}


CHAR_SPECIALS = ("<pad>", "<eos>", "<bos>", "<|User|>", "<|Assistant|>",
                 "<think>", "</think>", "<answer>", "</answer>")
CHAR_MARKERS = ChatMarkers(bos="<bos>", eos="<eos>", user="<|User|>", assistant="<|Assistant|>")


class CharTokenizer:
  """Character vocabulary for the tiny CPU configs: no download, vocab 105 (<= 128).

  ids 0..8 are `CHAR_SPECIALS` (0 = pad, 1 = eos, 2 = bos), then printable ASCII 32..126, then
  '\\n'. Special tags in the text become single tokens (longest match first).
  """

  def __init__(self):
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    self._itos = list(CHAR_SPECIALS) + chars
    self._char_to_id = {c: i + len(CHAR_SPECIALS) for i, c in enumerate(chars)}
    self.special = {s: i for i, s in enumerate(CHAR_SPECIALS)}
    self.vocab_size = len(self._itos)
    self.pad_id, self.eos_id, self.bos_id = 0, 1, 2
    self.markers = CHAR_MARKERS
    # Longest alternatives first so that a tag never loses to a shorter prefix of itself.
    alternatives = sorted(CHAR_SPECIALS, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self._split.split(text):
      if piece in self.special:
        ids.append(self.special[piece])
        continue
      for c in piece:
        i = self._char_to_id.get(c)
        if i is None:
          raise DataError(f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's "
                          f"vocabulary (printable ASCII and newline) in text {text[:40]!r}")
        ids.append(i)
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    skip = _control_ids(self) if skip_special else set()
    # ids past the vocabulary (a model's padded embedding rows) decode to U+FFFD, never crash
    n = len(self._itos)
    return "".join(self._itos[int(i)] if 0 <= int(i) < n else "\ufffd"
                   for i in ids if int(i) not in skip)


def _token_text(value) -> str | None:
  # tokenizer_config.json stores a token either as a string or as a serialized AddedToken.
  if isinstance(value, dict):
    return value.get("content")
  return value


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class HFTokenizer:
  """A HF `tokenizer.json` (tokenizers library) with eos/bos/pad from `tokenizer_config.json`.

  `path` is a directory holding `tokenizer.json` or the file itself. `eos_token` / `bos_token` /
  `pad_token` override the config. eos is required; pad falls back to eos; bos may be absent
  (Qwen2 has none), then `bos_id` is None and the template writes no bos. A ChatML vocabulary
  (<|im_start|>, <|im_end|>) gets ChatML role markers and <|im_end|> as eos.
  """

  def __init__(self, path: str, *, eos_token: str | None = None, bos_token: str | None = None,
               pad_token: str | None = None):
    import tokenizers  # Imported here so the char tokenizer works without it.

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise DataError(f"{file}: tokenizer file not found")
    try:
      self._tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # The library raises a bare Exception with a serde message.
      raise DataError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
      try:
        with open(config_file) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise DataError(f"{config_file}: line {e.lineno}: invalid JSON ({e.msg})") from None
    chatml = all(self._tok.token_to_id(t) is not None for t in CHATML_TOKENS)
    eos = eos_token or _token_text(config.get("eos_token"))
    bos = bos_token or _token_text(config.get("bos_token"))
    pad = pad_token or _token_text(config.get("pad_token")) or eos
    if chatml:
      # ChatML (SmolLM2, Qwen): <|im_start|> opens every turn, so it is no bos to strip, and a
      # turn ends with <|im_end|>; a pad distinct from eos where the vocab has <|endoftext|>
      bos = bos_token
      eos = eos_token or "<|im_end|>"
      if not pad_token and pad == eos and self._tok.token_to_id("<|endoftext|>") is not None:
        pad = "<|endoftext|>"
    if not eos:
      raise DataError(f"{config_file}: no eos_token (needed to end completions); "
                      "add it to tokenizer_config.json")
    self.eos_id = self._id_of(eos, "eos_token", config_file)
    self.pad_id = self._id_of(pad, "pad_token", config_file)
    self.bos_id = self._id_of(bos, "bos_token", config_file) if bos else None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
    if chatml:
      self.markers = ChatMarkers(bos=bos or "", eos=eos, user="<|im_start|>user\n",
                                 assistant="<|im_end|>\n<|im_start|>assistant\n")
    else:
      self.markers = ChatMarkers(bos=bos or "", eos=eos, user=self._marker("User"),
                                 assistant=self._marker("Assistant"))

  def _id_of(self, token: str, field: str, config_file: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise DataError(f"{config_file}: {field}={token!r} is not in the tokenizer's vocabulary")
    return i

  def _marker(self, role: str) -> str:
    # DeepSeek's vocab spells the role tags with fullwidth bars; fall back to ASCII bars, which
    # then tokenize into several ordinary tokens.
    fullwidth = f"<\uff5c{role}\uff5c>"
    return fullwidth if self._tok.token_to_id(fullwidth) is not None else f"<|{role}|>"

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    skip = _control_ids(self) if skip_special else set()
    return self._tok.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)


def get_tokenizer(name_or_path: str) -> Tokenizer:
  """"char" -> `CharTokenizer`; anything else is a path for `HFTokenizer`."""
  if name_or_path == "char":
    return CharTokenizer()
  return HFTokenizer(name_or_path)
