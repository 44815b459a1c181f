"""hf.load reports user-caused checkpoint problems as one clear UserError naming the culprit."""

from __future__ import annotations

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from r1jax import hf
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.errors import CheckpointError, UserError
from testing import random_params

TINY = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
            n_group=2, topk_group=1, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  cfg = ModelConfig.from_config(TINY)
  path = tmp_path_factory.mktemp("good")
  hf.save(str(path), cfg, random_params(cfg))
  hf.load(str(path))  # sanity: the unmodified checkpoint loads
  return path


@pytest.fixture
def ckpt(good_dir, tmp_path):
  """A private copy of the good checkpoint to break."""
  dst = tmp_path / "ckpt"
  shutil.copytree(good_dir, dst)
  return dst


def _edit_tensors(path, fn):
  f = path / "model.safetensors"
  tensors = load_file(str(f))
  fn(tensors)
  save_file(tensors, str(f))


def _load_error(path, cls):
  with pytest.raises(cls) as info:
    hf.load(str(path))
  assert isinstance(info.value, UserError)
  msg = str(info.value)
  assert "\n" not in msg, "errors are reported as one line"
  return msg


def test_missing_tensor_names_the_key(ckpt):
  key = "model.layers.1.mlp.experts.3.up_proj.weight"
  _edit_tensors(ckpt, lambda t: t.pop(key))
  assert key in _load_error(ckpt, CheckpointError)


def test_wrong_shape_names_key_expected_and_found(ckpt):
  key = "model.layers.0.self_attn.kv_b_proj.weight"

  def shrink(t):
    assert t[key].shape == (2 * (8 + 8), 16)
    t[key] = np.zeros((2 * (8 + 8), 12), np.float32)

  _edit_tensors(ckpt, shrink)
  msg = _load_error(ckpt, CheckpointError)
  assert key in msg and "(32, 16)" in msg and "(32, 12)" in msg, msg


def test_wrong_shape_of_a_norm(ckpt):
  key = "model.layers.1.post_attention_layernorm.weight"
  _edit_tensors(ckpt, lambda t: t.__setitem__(key, np.ones((33,), np.float32)))
  msg = _load_error(ckpt, CheckpointError)
  assert key in msg and "(32,)" in msg and "(33,)" in msg, msg


def test_unexpected_tensor_is_named(ckpt):
  key = "model.layers.1.mlp.experts.4.up_proj.weight"  # a 5th expert: config says 4
  _edit_tensors(ckpt, lambda t: t.__setitem__(key, np.zeros((16, 32), np.float32)))
  assert key in _load_error(ckpt, CheckpointError)


def _edit_config(path, fn):
  f = path / "config.json"
  f.write_text(fn(f.read_text()))


def test_unknown_model_type(ckpt):
  _edit_config(ckpt, lambda s: s.replace('"model_type": "deepseek_v3"', '"model_type": "gpt2"'))
  msg = _load_error(ckpt, ConfigError)
  assert "model_type='gpt2'" in msg and "deepseek_v3" in msg, msg


@pytest.mark.parametrize("text,expected", [
    (lambda s: s[:len(s) // 2], r"config\.json: malformed JSON"),
    (lambda s: "[1, 2]", r"config\.json: expected a JSON object"),
    (lambda s: s.replace('"hidden_size": 32', '"hidden_size": [32]'), r"hidden_size"),
    (lambda s: s.replace('"n_group": 2', '"n_group": 3'), r"n_group=3 must divide"),
])
def test_malformed_config_json(ckpt, text, expected):
  _edit_config(ckpt, text)
  assert re.search(expected, _load_error(ckpt, ConfigError))


def test_missing_config_json(ckpt):
  (ckpt / "config.json").unlink()
  assert "config.json: not found" in _load_error(ckpt, ConfigError)


def test_not_a_directory(tmp_path):
  assert "not a directory" in _load_error(tmp_path / "nowhere", CheckpointError)


def test_no_safetensors(ckpt):
  (ckpt / "model.safetensors").unlink()
  assert "no *.safetensors" in _load_error(ckpt, CheckpointError)


def test_index_lists_a_missing_shard(ckpt):
  tensors = load_file(str(ckpt / "model.safetensors"))
  weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
  weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
  (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
  (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  assert "model-00002-of-00002.safetensors" in _load_error(ckpt, CheckpointError)


def test_corrupt_safetensors_file(ckpt):
  (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  assert "model.safetensors" in _load_error(ckpt, CheckpointError)


def test_fp8_weight_without_scale(ckpt):
  key = "model.layers.0.mlp.up_proj.weight"

  def to_fp8(t):
    t[key] = t[key].astype(ml_dtypes.float8_e4m3fn)

  _edit_tensors(ckpt, to_fp8)
  msg = _load_error(ckpt, CheckpointError)
  assert key in msg and "weight_scale_inv" in msg, msg


def test_fp8_scale_of_wrong_shape(ckpt):
  key = "model.layers.0.mlp.up_proj.weight"

  def to_fp8(t):
    t[key] = t[key].astype(ml_dtypes.float8_e4m3fn)
    t[key + "_scale_inv"] = np.ones((2, 1), np.float32)  # [48, 32] needs (1, 1) blocks

  _edit_tensors(ckpt, to_fp8)
  msg = _load_error(ckpt, CheckpointError)
  assert key + "_scale_inv" in msg and "(1, 1)" in msg and "(2, 1)" in msg, msg
