"""Tokenizers and the chat template: ids, round trips, token layout of prompts and completions."""

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from r1jax.data import template
from r1jax.data.tokenizer import CharTokenizer, HFTokenizer, get_tokenizer
from r1jax.errors import DataError, UserError

NL = 104  # '\n' is the last id of the char vocab.


def ch(c):
  """Char-tokenizer id of a printable ASCII character."""
  return 9 + ord(c) - 32


def test_char_vocab_layout():
  tok = CharTokenizer()
  assert tok.vocab_size == 105 <= 128
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.special == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<|User|>": 3, "<|Assistant|>": 4,
                         "<think>": 5, "</think>": 6, "<answer>": 7, "</answer>": 8}
  assert tok.encode(" ~\n") == [9, 103, NL]


def test_char_round_trip_and_single_token_tags():
  tok = CharTokenizer()
  text = "".join(chr(c) for c in range(32, 127)) + "\n<think>a</think><answer>7</answer><eos>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.encode("<think>x</think>") == [5, ch("x"), 6]
  # A partial tag or a bare '<' is ordinary text.
  assert tok.encode("<thin<") == [ch(c) for c in "<thin<"]
  assert tok.encode("<<|User|>") == [ch("<"), 3]


def test_char_decode_skip_special_keeps_tags():
  tok = CharTokenizer()
  ids = [2, 5, ch("a"), 6, 1, 0, 0]
  assert tok.decode(ids) == "<bos><think>a</think><eos><pad><pad>"
  assert tok.decode(ids, skip_special=True) == "<think>a</think>"


def test_char_unknown_character_names_it():
  with pytest.raises(DataError, match=r"'é' \(U\+00E9\)"):
    CharTokenizer().encode("café")
  assert issubclass(DataError, UserError)


def test_r1_prompt_token_layout():
  tok = CharTokenizer()
  prompt = template.format_prompt("1+2")
  assert prompt == "<bos><|User|>1+2<|Assistant|><think>\n"
  assert tok.encode(prompt) == [2, 3, ch("1"), ch("+"), ch("2"), 4, 5, NL]


def test_completion_token_layout():
  tok = CharTokenizer()
  completion = template.format_completion("2+1=3", "3")
  assert completion == "2+1=3\n</think>\n<answer>3</answer><eos>"
  assert tok.encode(completion) == [ch(c) for c in "2+1=3"] + [NL, 6, NL, 7, ch("3"), 8, 1]


def test_completion_text_from_fields():
  built = template.completion_text({"question": "q", "reasoning": "r", "answer": 5})
  assert built == "r\n</think>\n<answer>5</answer><eos>"
  # A given completion that re-opens <think> loses it; a missing eos is added once.
  given = template.completion_text({"question": "q", "completion": "<think>\nr</think>ok"})
  assert given == "r</think>ok<eos>"
  assert template.completion_text({"completion": "done<eos>"}) == "done<eos>"
  with pytest.raises(DataError, match="neither a completion nor reasoning"):
    template.completion_text({"question": "1+1", "reasoning": None, "answer": "2"})


def test_r1_zero_templates():
  tok = CharTokenizer()
  full = template.format_prompt("12+34", "r1_zero")
  assert full.startswith("<bos>A conversation between User and Assistant.")
  assert full.endswith("User: 12+34. Assistant: <think>")
  short = template.format_prompt("123+456", "r1_zero_short")
  assert short == ("<bos>User: 123+456. Reply <think> </think> <answer> </answer>. "
                   "Assistant: <think>")
  example = short + template.format_completion("3+6=9;2+5=7;1+4=5", "579")
  # The tiny task's budget: a 3-digit example stays well under 96 char tokens.
  assert len(tok.encode(example)) < 96 < len(tok.encode(full))
  with pytest.raises(ValueError, match="unknown template 'chatml'"):
    template.format_prompt("x", "chatml")


def _save_word_tokenizer(directory, config):
  """A WordLevel tokenizer trained on a few strings, with DeepSeek-style role markers."""
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["<unk>", "<pad>", "<s>", "</s>", "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]
  trainer = trainers.WordLevelTrainer(special_tokens=specials)
  tok.train_from_iterator(["the cat sat", "the dog ran", "a cat ran"], trainer=trainer)
  tok.save(str(directory / "tokenizer.json"))
  if config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return tok


def test_hf_tokenizer(tmp_path):
  raw = _save_word_tokenizer(tmp_path, {"eos_token": "</s>", "bos_token": {"content": "<s>"}})
  tok = get_tokenizer(str(tmp_path))
  assert isinstance(tok, HFTokenizer)
  assert tok.eos_id == raw.token_to_id("</s>") and tok.bos_id == raw.token_to_id("<s>")
  assert tok.pad_id == tok.eos_id  # No pad in the config: falls back to eos.
  assert tok.vocab_size == raw.get_vocab_size()
  assert tok.special["<s>"] == tok.bos_id
  assert tok.markers.user == "<\uff5cUser\uff5c>"
  ids = tok.encode("the cat ran")
  assert len(ids) == 3 and tok.decode(ids) == "the cat ran"
  prompt_ids = tok.encode(template.format_prompt("a dog sat", markers=tok.markers))
  assert prompt_ids[:2] == [tok.bos_id, raw.token_to_id("<\uff5cUser\uff5c>")]
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id], skip_special=True) == "the cat ran"
  # The file path works as well as the directory.
  assert HFTokenizer(str(tmp_path / "tokenizer.json")).encode("a cat") == tok.encode("a cat")


def test_hf_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match="tokenizer file not found"):
    HFTokenizer(str(tmp_path / "nope"))
  _save_word_tokenizer(tmp_path, None)
  with pytest.raises(DataError, match=r"tokenizer_config.json: no eos_token"):
    HFTokenizer(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
  with pytest.raises(DataError, match=r"eos_token='<\|end\|>' is not in the tokenizer's vocab"):
    HFTokenizer(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
  with pytest.raises(DataError, match=r"tokenizer_config.json: line 1: invalid JSON"):
    HFTokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(DataError, match="not a valid tokenizer.json"):
    HFTokenizer(str(tmp_path))


def test_get_tokenizer_char():
  assert isinstance(get_tokenizer("char"), CharTokenizer)
