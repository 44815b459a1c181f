"""HF checkpoint interop: load and save DeepseekV3 / DeepseekV2 / Qwen2 / Qwen3 / Qwen3-MoE / Llama
ForCausalLM (and ForSequenceClassification: `score.weight` in place of `lm_head.weight`)
safetensors.

    cfg, params = hf.load("dir", dtype=jnp.float32)  # config.json + *.safetensors (+ index)
    hf.save("out_dir", cfg, params)                   # loadable by transformers' from_pretrained

Loading is streamed: each safetensors file is memory-mapped and every tensor is copied straight
into its slot of the (stacked) result, so host memory stays near the size of the result. FP8
weights with `weight_scale_inv` (128x128 blocks) are dequantized on the way. The hub's MTP layer
(`model.layers.{num_hidden_layers + k}.*`) fills the MTP module; its duplicated embedding and
head are checked against nothing and skipped (the model shares the main ones).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from r1jax.errors import CheckpointError, ConfigError
from r1jax.model.config import ModelConfig
from r1jax.model import families
from r1jax.model import params as param_lib

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FP8_BLOCK = 128


class Entry(NamedTuple):
  path: tuple[str, ...]  # path in our param tree
  index: tuple[int, ...]  # index into the stacked leaf (layer[, expert])
  key: str  # HF tensor name
  n_in: int  # leading dims of our slice that form the linear's input; 0 = not a linear


# ------------------------------------------------------------------ name map
def _norm_entries():
  yield ("attn_norm",), "input_layernorm.weight", 0
  yield ("mlp_norm",), "post_attention_layernorm.weight", 0


def _ffn_entries(cfg: ModelConfig, moe: bool):
  names = ("gate", "up", "down")
  if not moe:
    for w in names:
      yield ("mlp", w), f"mlp.{w}_proj.weight", 1
    return
  yield ("moe", "router"), "mlp.gate.weight", 1
  if cfg.topk_method == "noaux_tc":  # V2-style routers have no correction bias
    yield ("moe", "router_bias"), "mlp.gate.e_score_correction_bias", 0
  for w in names:
    for e in range(cfg.n_routed_experts):
      yield ("moe", w, e), f"mlp.experts.{e}.{w}_proj.weight", 1
  if cfg.n_shared_experts:
    for w in names:
      yield ("moe", "shared", w), f"mlp.shared_experts.{w}_proj.weight", 1


def _layer_entries(cfg: ModelConfig, moe: bool) -> list:
  attn = families.ATTENTION[cfg.attention].hf_entries(cfg)
  return [*_norm_entries(), *attn, *_ffn_entries(cfg, moe)]


def _stack_entries(templates, stack: tuple[str, ...], layer: int, hf_layer: int):
  for sub, suffix, n_in in templates:
    idx = (layer,)
    if isinstance(sub[-1], int):  # per-expert tensor: last element is the expert index
      sub, idx = sub[:-1], (layer, sub[-1])
    yield Entry(stack + sub, idx, f"model.layers.{hf_layer}.{suffix}", n_in)


def entries(cfg: ModelConfig) -> Iterator[Entry]:
  """Every HF tensor of `cfg` and where it lives in our param tree."""
  yield Entry(("embed",), (), "model.embed_tokens.weight", 0)
  yield Entry(("final_norm",), (), "model.norm.weight", 0)
  if cfg.num_labels:
    yield Entry(("score",), (), "score.weight", 1)
  elif not cfg.tie_word_embeddings:
    yield Entry(("lm_head",), (), "lm_head.weight", 1)
  hf_layer = 0
  for stack, start, count in cfg.layer_runs:  # HF numbers the layers in order
    for j in range(start, start + count):
      yield from _stack_entries(_layer_entries(cfg, stack == "moe_layers"), (stack,), j,
                                hf_layer)
      hf_layer += 1
  for k in range(cfg.num_nextn_predict_layers):
    hf_layer = cfg.num_hidden_layers + k
    t = [(("layer",) + s, suf, n) for s, suf, n in
         _layer_entries(cfg, param_lib.mtp_layer_is_moe(cfg, k))]
    t += [(("enorm",), "enorm.weight", 0), (("hnorm",), "hnorm.weight", 0),
          (("eh_proj",), "eh_proj.weight", 1), (("norm",), "shared_head.norm.weight", 0)]
    yield from _stack_entries(t, ("mtp",), k, hf_layer)


def _ignored(cfg: ModelConfig, key: str) -> bool:
  """HF tensors we deliberately do not load: rotary buffers, the MTP layer's copies of the
  shared embedding and head."""
  if key.endswith("rotary_emb.inv_freq"):
    return True
  m = re.match(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$", key)
  return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


# ------------------------------------------------------------------ reading
class _SafetensorsFile:
  """Memory-mapped safetensors reader (any dtype, FP8 included)."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        self.header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    self.header.pop("__metadata__", None)
    self.offset = 8 + n
    self.mm = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self):
    return self.header.keys()

  def get(self, key: str) -> np.ndarray:
    h = self.header[key]
    if h["dtype"] not in _ST_DTYPES:
      raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {h['dtype']}")
    start, end = h["data_offsets"]
    raw = self.mm[self.offset + start:self.offset + end]
    return raw.view(_ST_DTYPES[h["dtype"]]).reshape(h["shape"])


class _Reader:
  """All tensors of a HF checkpoint dir, one or many files (with or without an index)."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e})") from None
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    self.where: dict[str, _SafetensorsFile] = {}
    for fn in files:
      full = os.path.join(path, fn)
      if not os.path.isfile(full):
        raise CheckpointError(f"{full}: listed in the index but missing")
      st = _SafetensorsFile(full)
      for k in st.keys():
        self.where[k] = st

  def get(self, key: str) -> np.ndarray:
    """The tensor as fp32 (FP8 blocks dequantized with their weight_scale_inv)."""
    if key not in self.where:
      raise CheckpointError(f"checkpoint is missing tensor {key}")
    t = self.where[key].get(key)
    if t.dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
      scale_key = key + "_scale_inv"
      if scale_key not in self.where:
        raise CheckpointError(f"FP8 tensor {key} has no {scale_key}")
      return dequantize_fp8(t, self.where[scale_key].get(scale_key), key)
    return t.astype(np.float32)


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, key: str = "weight") -> np.ndarray:
  """[out, in] e4m3 blocks times their [ceil(out/128), ceil(in/128)] fp32 scales."""
  rows, cols = w.shape
  want = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
  if tuple(scale_inv.shape) != want:
    raise CheckpointError(f"{key}_scale_inv: expected shape {want}, found {tuple(scale_inv.shape)}")
  s = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)
  return w.astype(np.float32) * s[:rows, :cols]


def _to_ours(t: np.ndarray, e: Entry, shape: tuple[int, ...]) -> np.ndarray:
  if e.n_in:
    want = (math.prod(shape[e.n_in:]), math.prod(shape[:e.n_in]))
    if t.shape != want:
      raise CheckpointError(f"tensor {e.key}: expected shape {want}, found {tuple(t.shape)}")
    return t.T.reshape(shape)
  if math.prod(t.shape) != math.prod(shape) or (len(t.shape) == len(shape) and t.shape != shape):
    raise CheckpointError(f"tensor {e.key}: expected shape {shape}, found {tuple(t.shape)}")
  return t.reshape(shape)


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def load(path: str, dtype=jnp.float32, **overrides):
  """Load a HF checkpoint dir into (ModelConfig, params). `overrides` set ModelConfig fields
  (e.g. moe_impl="capacity")."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  cfg = ModelConfig.from_hf_dir(path, param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name,
                                **overrides)
  reader = _Reader(path)
  if cfg.is_moe and cfg.num_nextn_predict_layers and not any(
      k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in reader.where):
    # transformers drops the MTP layer on save; the model then has no MTP module
    logging.warning("%s: config has num_nextn_predict_layers=%d but the checkpoint holds no MTP "
                    "layer; loading without MTP", path, cfg.num_nextn_predict_layers)
    cfg = cfg.replace(num_nextn_predict_layers=0)
  abstract = param_lib.abstract(cfg)
  # zeros, not empty: leaves without a checkpoint tensor (V2's router_bias) must be defined
  buffers = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  seen = set()
  for e in entries(cfg):
    leaf = _get_path(buffers, e.path)
    slot_shape = leaf.shape[len(e.index):]
    leaf[e.index] = _to_ours(reader.get(e.key), e, slot_shape).astype(leaf.dtype)
    seen.add(e.key)
  extra = [k for k in reader.where if k not in seen and not k.endswith("_scale_inv")
           and not _ignored(cfg, k)]
  if extra:
    raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensors, e.g. {extra[0]} "
                          "(does config.json match the weights?)")
  return cfg, jax.tree.map(jnp.asarray, buffers)


# ------------------------------------------------------------------ writing
def save(path: str, cfg: ModelConfig, params, *, max_shard_bytes: int | None = None):
  """Write config.json and safetensors (sharded with an index past max_shard_bytes)."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  host = jax.tree.map(np.asarray, params)
  tensors = {}
  for e in entries(cfg):
    t = np.asarray(_get_path(host, e.path)[e.index])
    if e.n_in:
      t = t.reshape(math.prod(t.shape[:e.n_in]), -1).T
    elif e.key.endswith(".bias"):
      t = t.reshape(-1)  # HF biases are flat; ours keep the head axis ([H, d])
    tensors[e.key] = np.ascontiguousarray(t)
  shards, cur, size = [], {}, 0
  for k, t in tensors.items():
    if max_shard_bytes and cur and size + t.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = t
    size += t.nbytes
  shards.append(cur)
  hf_cfg = cfg.to_hf()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}, f, indent=2)


__all__ = ["load", "save", "entries", "dequantize_fp8", "ConfigError", "CheckpointError"]
