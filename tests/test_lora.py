"""LoRA over the parameter tree: zero-B identity, merged HF export (ours and transformers'),
gradients against the full model's projected onto the low-rank factors, parameter counts and
shardings, for the tiny DeepSeek MoE and tiny Qwen2 / Llama students."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_testing as H
import testing
from r1jax.model import num_params
from r1jax import hf, model, parallel
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.model import lora
from r1jax.run_config import tiny_moe_fields, tiny_student_fields

FIELDS = {
    "deepseek": tiny_moe_fields(),  # MLA with q-LoRA, shared + routed experts, MTP
    "qwen2": tiny_student_fields(),  # q/k/v biases, tied embeddings
    "llama": tiny_student_fields(model_type="llama", tie_word_embeddings=False),
}
# routed experts adapted in the DeepSeek cases, so [L, E, in, out] weights are covered
LORA = {"deepseek": lora.LoraConfig(rank=4, alpha=8.0, experts=True),
        "qwen2": lora.LoraConfig(rank=4, alpha=8.0),
        "llama": lora.LoraConfig(rank=4, alpha=8.0)}


@functools.lru_cache(maxsize=None)
def _cfg(name) -> ModelConfig:
  return ModelConfig.from_config(FIELDS[name])


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return testing.jit(functools.partial(model.forward, cfg=cfg))


def _tokens(cfg, batch=2, length=24, seed=0):
  return jnp.asarray(H.random_tokens(cfg.vocab_size, batch, length, seed))


def _random_b(adapters, seed: int, std: float = 0.1):
  """Adapters with random B (init's B is zero), so merged weights differ from the base."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['b']"):
      return jnp.asarray(std * rng.standard_normal(x.shape, dtype=np.float32))
    return x

  return jax.tree_util.tree_map_with_path(fill, adapters)


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _adapter_paths(adapters):
  """Paths of the adapted weights ((..., "a") leaves without the "a")."""
  return [tuple(k.key for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]
          if p[-1].key == "a"]


@pytest.mark.parametrize("name", list(FIELDS))
def test_zero_b_leaves_the_model_unchanged(name):
  cfg, lcfg = _cfg(name), LORA[name]
  params = model.init(cfg, jax.random.key(0))
  adapters = lora.init(cfg, lcfg, params, jax.random.key(1))
  merged = lora.merge(params, adapters, lcfg)
  for path in _adapter_paths(adapters):
    assert float(jnp.abs(_leaf(adapters, path)["a"]).max()) > 0  # A is random, B zero
  tokens = _tokens(cfg)
  np.testing.assert_array_equal(_forward(cfg)(merged, tokens), _forward(cfg)(params, tokens))
  assert merged["embed"] is params["embed"]  # leaves without adapters are passed through


@pytest.mark.parametrize("name", list(FIELDS))
def test_merged_export_matches(name, tmp_path):
  """export -> hf.load gives the merged model's logits; transformers too for dense models."""
  cfg, lcfg = _cfg(name), LORA[name]
  params = testing.random_params(cfg, seed=1)
  adapters = _random_b(lora.init(cfg, lcfg, params, jax.random.key(2)), seed=3)
  tokens = _tokens(cfg, seed=4)
  merged_logits = np.asarray(_forward(cfg)(lora.merge(params, adapters, lcfg), tokens))
  base_logits = np.asarray(_forward(cfg)(params, tokens))
  assert H.max_err(merged_logits, base_logits) > 0.1, "the adapters change nothing"

  lora.export(str(tmp_path), cfg, params, adapters, lcfg)
  cfg2, params2 = hf.load(str(tmp_path), moe_impl=cfg.moe_impl,
                          capacity_factor=cfg.capacity_factor, scan_layers=cfg.scan_layers)
  # config.json makes head_dim (for DeepSeek: HF's rope head dim) and the KV heads explicit
  same = lambda c: c.replace(head_dim=None, num_key_value_heads=c.kv_heads)
  assert same(cfg2) == same(cfg)
  assert cfg.is_moe or cfg2.dense_head_dim == cfg.dense_head_dim
  err = H.max_err(_forward(cfg)(params2, tokens), merged_logits)
  assert err < 1e-5, f"hf.load of the export: max abs logit error {err}"
  if cfg.is_moe:
    return
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
  assert type(ref_model).__name__ == {"qwen2": "Qwen2ForCausalLM",
                                      "llama": "LlamaForCausalLM"}[name]
  err = H.max_err(H.hf_logits(ref_model, np.array(tokens)), merged_logits)
  assert err < 1e-4, f"transformers on the export: max abs logit error {err}"


def _loss(params, tokens, cfg):
  logits = model.forward(params, tokens[:, :-1], cfg)
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


@pytest.mark.parametrize("name", ["deepseek", "llama"])
def test_gradients_are_the_full_gradient_projected(name):
  """dL/dA = scale * G B^T and dL/dB = scale * A^T G, with G = dL/dW at the merged weights."""
  cfg, lcfg = _cfg(name), LORA[name]
  params = testing.random_params(cfg, seed=5)
  adapters = _random_b(lora.init(cfg, lcfg, params, jax.random.key(6)), seed=7)
  tokens = _tokens(cfg, seed=8)

  @testing.jit
  def both(params, adapters, tokens):
    g_adapters = jax.grad(lambda a: _loss(lora.merge(params, a, lcfg), tokens, cfg))(adapters)
    g_full = jax.grad(_loss)(lora.merge(params, adapters, lcfg), tokens, cfg)
    return g_adapters, g_full

  g_adapters, g_full = both(params, adapters, tokens)
  s = lcfg.scale
  checked = 0
  for path in _adapter_paths(adapters):
    a, b = (np.asarray(_leaf(adapters, path)[k], np.float64) for k in ("a", "b"))
    g = np.asarray(_leaf(g_full, path), np.float64)
    n_stack = a.ndim + b.ndim - 2 - g.ndim
    stack, r = a.shape[:n_stack], a.shape[-1]
    a_, b_ = a.reshape(*stack, -1, r), b.reshape(*stack, r, -1)
    g_ = g.reshape(*stack, a_.shape[-2], b_.shape[-1])
    want_a = s * g_ @ np.swapaxes(b_, -1, -2)
    want_b = s * np.swapaxes(a_, -1, -2) @ g_
    got_a, got_b = (np.asarray(_leaf(g_adapters, path)[k]) for k in ("a", "b"))
    np.testing.assert_allclose(got_a, want_a.reshape(a.shape), rtol=0, atol=1e-5,
                               err_msg=f"dL/dA of {path}")
    np.testing.assert_allclose(got_b, want_b.reshape(b.shape), rtol=0, atol=1e-5,
                               err_msg=f"dL/dB of {path}")
    # only the MTP module (unused by this loss) may have zero gradients
    if path[0] != "mtp":
      assert np.abs(want_a).max() > 1e-4 and np.abs(want_b).max() > 1e-4, path
      checked += 1
  assert checked >= {"deepseek": 17, "llama": 7}[name]


def test_parameter_count_matches_the_formula():
  r = 4
  cfg = _cfg("qwen2")
  D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  q, kv = cfg.num_attention_heads * cfg.dense_head_dim, cfg.kv_heads * cfg.dense_head_dim
  per_layer = r * ((D + q) + 2 * (D + kv) + (q + D) + 2 * (D + I) + (I + D))
  assert lora.num_params(cfg, LORA["qwen2"]) == L * per_layer

  cfg = _cfg("deepseek")
  D, H = cfg.hidden_size, cfg.num_attention_heads
  mla = r * ((D + cfg.q_lora_rank) + (cfg.q_lora_rank + H * cfg.qk_head_dim)
             + (D + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
             + (cfg.kv_lora_rank + H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
             + (H * cfg.v_head_dim + D))
  mlp = lambda width: 3 * r * (D + width)  # gate, up, down
  shared = mlp(cfg.n_shared_experts * cfg.moe_intermediate_size)
  routed = cfg.n_routed_experts * mlp(cfg.moe_intermediate_size)
  dense_layer, moe_layer = mla + mlp(cfg.intermediate_size), mla + shared
  moe_layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers  # the MTP layer is a MoE layer
  without = cfg.num_dense_layers * dense_layer + moe_layers * moe_layer
  assert lora.num_params(cfg, lora.LoraConfig(rank=r)) == without
  assert lora.num_params(cfg, LORA["deepseek"]) == without + moe_layers * routed
  adapters = jax.eval_shape(lambda k: lora.init(cfg, LORA["deepseek"], model.abstract(cfg), k),
                            jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(adapters)) == without + moe_layers * routed
  assert without < 0.05 * num_params(cfg)


def test_logical_axes_shard_the_adapters():
  cfg, lcfg = _cfg("deepseek"), LORA["deepseek"]
  axes = lora.logical_axes(cfg, lcfg)
  attn = axes["moe_layers"]["attn"]
  assert attn["q_b"]["a"] == ("layers", "q_lora", None)
  assert attn["q_b"]["b"] == ("layers", None, "heads", "head_dim")
  assert attn["o"]["a"] == ("layers", "heads", "head_dim", None)
  assert axes["moe_layers"]["moe"]["gate"]["a"] == ("layers", "exp", "embed", None)
  assert axes["moe_layers"]["moe"]["down"]["b"] == ("layers", "exp", None, "embed")
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
  shardings = lora.shardings(cfg, lcfg, mesh)
  spec = lambda *path: _leaf(shardings, path).spec
  assert spec("moe_layers", "moe", "gate", "a") == jax.sharding.PartitionSpec(
      None, "expert", "fsdp", None)
  assert spec("moe_layers", "attn", "q_b", "b") == jax.sharding.PartitionSpec(
      None, None, "tensor", None)
  # sharded adapters and parameters merge to the same weights as unsharded ones
  params = testing.random_params(cfg, seed=9)
  adapters = _random_b(lora.init(cfg, lcfg, params, jax.random.key(10)), seed=11)
  merge = testing.jit(lora.merge, static_argnums=2)
  want = merge(params, adapters, lcfg)
  got = merge(parallel.shard_params(params, cfg, mesh), jax.device_put(adapters, shardings), lcfg)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), got, want)


def test_merge_keeps_the_weight_dtype():
  cfg, lcfg = _cfg("qwen2"), LORA["qwen2"]
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), testing.random_params(cfg))
  adapters = _random_b(lora.init(cfg, lcfg, params, jax.random.key(0)), seed=1)
  merged = lora.merge(params, adapters, lcfg)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
  q = merged["layers"]["attn"]["q"]
  assert float(jnp.abs(q.astype(jnp.float32) - params["layers"]["attn"]["q"]).max()) > 1e-2


def test_config_errors_are_one_line():
  cfg = _cfg("qwen2")
  for bad, match in [(dict(rank=0), "lora.rank=0"), (dict(alpha=-1.0), "lora.alpha=-1.0"),
                     (dict(targets=()), "lora.targets")]:
    with pytest.raises(ConfigError, match=match):
      lora.LoraConfig(**bad)
  with pytest.raises(ConfigError, match="'embed' .* is not a projection"):
    lora.num_params(cfg, lora.LoraConfig(targets=("q", "embed")))
  with pytest.raises(ConfigError, match="'qproj' names no weight"):
    lora.num_params(cfg, lora.LoraConfig(targets=("q", "qproj")))
  with pytest.raises(ConfigError, match="select no weight"):
    lora.num_params(cfg, lora.LoraConfig(targets=("q_a", "kv_b")))
  with pytest.raises(ConfigError, match="another config"):
    lora.init(cfg, lora.LoraConfig(), model.abstract(_cfg("deepseek")), jax.random.key(0))
  assert hash(lora.LoraConfig(targets=["q", "v"])) == hash(lora.LoraConfig(targets=("q", "v")))
