"""Sequence classifiers (reward models: `ModelConfig.num_labels`) against transformers'
*ForSequenceClassification on tiny random checkpoints of every family written by `hf.save`.

Each checkpoint loads in AutoModelForSequenceClassification with no missing or unexpected
weights; on a right-padded batch of rows of different lengths, `model.reward_scores` at each
row's last real token equals transformers' score at its last non-pad token (and misses it one
token earlier); `hf.load` gives the saved params back. Also: config refusals, the LM-head paths
refusing a classifier, init, parameter and FLOP counts, and the score head on an 8-device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import testing
from r1jax import flops, hf, model, parallel
from r1jax.errors import ConfigError
from r1jax.model import ModelConfig
from r1jax.run_config import tiny_moe_fields

PAD = 0
TOL = 1e-5  # float32, relative to max(1, |score|)
LENGTHS = (24, 19, 13, 6)  # right padding after each row's end
T = max(LENGTHS)

# tiny configs of every family, as in hf_testing's transformers configs (head_dim apart from
# hidden / heads for Qwen3, q/k/v biases for Qwen2, dense and MoE layers for both MoE families)
_GQA = dict(vocab_size=144, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(_GQA, model_type="llama", rms_norm_eps=1e-5),
    "qwen2": dict(_GQA, model_type="qwen2", hidden_size=48, num_attention_heads=6,
                  tie_word_embeddings=True),
    "qwen3": dict(_GQA, model_type="qwen3", hidden_size=48, head_dim=16),
    "qwen3_moe": dict(_GQA, model_type="qwen3_moe", hidden_size=48, head_dim=16,
                      num_hidden_layers=3, decoder_sparse_step=2, n_routed_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    # the CPU configs' DeepSeek-V3 (q-LoRA MLA, YaRN, correction-bias routing, shared expert)
    # without MTP; dropless
    "deepseek_v3": tiny_moe_fields(num_hidden_layers=2, num_nextn_predict_layers=0,
                                   moe_impl="ragged_dot", scan_layers=True),
}


def classifier(family: str, num_labels: int = 1) -> ModelConfig:
  return ModelConfig.from_config(dict(FAMILIES[family], num_labels=num_labels, pad_token_id=PAD))


def batch(cfg: ModelConfig, seed: int = 0):
  """Right-padded tokens [B, T] (real tokens never the pad id) and the real-token mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, size=(len(LENGTHS), T), dtype=np.int32)
  real = np.arange(T)[None] < np.asarray(LENGTHS)[:, None]
  return np.where(real, tokens, PAD).astype(np.int32), real


@functools.lru_cache(maxsize=None)
def _scores_fn(cfg: ModelConfig):
  return testing.jit(lambda p, t, last, mask: model.reward_scores(p, t, cfg, last=last,
                                                                  token_mask=mask))


def our_scores(cfg, params, tokens, real, last) -> np.ndarray:
  scores, aux = _scores_fn(cfg)(params, tokens, np.asarray(last, np.int32), real)
  if cfg.is_moe:  # padding reaches no expert; every real token reaches k of them
    assert float(aux["dropped"]) == 0
    assert int(aux["expert_counts"].sum()) == (
        real.sum() * cfg.num_experts_per_tok * cfg.num_moe_layers)
  return np.asarray(scores)


@torch.no_grad()
def hf_scores(hf_model, tokens, real) -> np.ndarray:
  out = hf_model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                 attention_mask=torch.as_tensor(real, dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


class Checkpoint:
  """A random classifier of ours saved by hf.save, and transformers' model loaded from it."""

  def __init__(self, cfg, path, seed):
    self.cfg, self.path = cfg, str(path)
    self.params = testing.random_params(cfg, seed)  # std 0.1: every weight moves the scores
    if cfg.is_moe and cfg.topk_method != "noaux_tc":  # softmax routers have no correction bias
      moe = self.params["moe_layers"]["moe"]
      moe["router_bias"] = jnp.zeros_like(moe["router_bias"])
    hf.save(self.path, cfg, self.params)
    self.hf_model, self.info = transformers.AutoModelForSequenceClassification.from_pretrained(
        self.path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    self.hf_model.eval()
    self.tokens, self.real = batch(cfg, seed)
    self.ref = hf_scores(self.hf_model, self.tokens, self.real)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  cache = {}

  def get(family, num_labels=1):
    key = (family, num_labels)
    if key not in cache:
      cache[key] = Checkpoint(classifier(family, num_labels),
                              tmp_path_factory.mktemp(f"{family}_{num_labels}"),
                              seed=len(FAMILIES) * num_labels + list(FAMILIES).index(family))
    return cache[key]

  return get


CASES = [(f, 1) for f in FAMILIES] + [("qwen3", 2)]


@pytest.mark.parametrize("family,num_labels", CASES)
def test_scores_match_transformers(checkpoints, family, num_labels):
  ck = checkpoints(family, num_labels)
  cfg = ck.cfg
  arch = type(ck.hf_model).__name__
  assert arch.endswith("ForSequenceClassification") and arch == cfg.hf_architecture
  assert not ck.info["missing_keys"] and not ck.info["unexpected_keys"], ck.info
  assert ck.hf_model.config.num_labels == num_labels and ck.ref.shape == (len(LENGTHS),
                                                                         num_labels)
  # the scores vary over rows, so a wrong position or weight cannot match by accident
  assert np.ptp(ck.ref, axis=0).min() > 0.1
  ours = our_scores(cfg, ck.params, ck.tokens, ck.real, np.asarray(LENGTHS) - 1)
  assert ours.dtype == np.float32 and ours.shape == ck.ref.shape
  err = rel_err(ours, ck.ref)
  print(f"{family} num_labels={num_labels}: max score error {err:.2e}")
  assert err < TOL, f"{family}: max score error {err}"
  # negative control: one token earlier misses by far more than the tolerance
  early = our_scores(cfg, ck.params, ck.tokens, ck.real, np.asarray(LENGTHS) - 2)
  assert rel_err(early, ck.ref) > 1000 * TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_load_round_trip(checkpoints, family):
  ck = checkpoints(family)
  written = json.loads(open(f"{ck.path}/config.json").read())
  assert written["architectures"] == [ck.cfg.hf_architecture]
  assert written["id2label"] == {"0": "LABEL_0"} and written["pad_token_id"] == PAD
  cfg2, params2 = hf.load(ck.path)
  assert cfg2.num_labels == 1 and cfg2.to_hf() == ck.cfg.to_hf()
  assert "score" in params2 and "lm_head" not in params2
  jax.tree.map(np.testing.assert_array_equal, params2, ck.params)


def test_config_refusals():
  with pytest.raises(ConfigError, match="num_labels=-1"):
    classifier("llama", num_labels=-1)
  with pytest.raises(ConfigError, match="num_nextn_predict_layers=0"):
    ModelConfig.from_config(tiny_moe_fields(num_labels=1, num_nextn_predict_layers=1))


def test_from_hf_reads_the_architecture():
  """A classifier's num_labels comes from its architecture and id2label (transformers' default
  2 without one; no MTP module); a causal LM's config with a stray num_labels stays an LM."""
  hf_cfg = classifier("deepseek_v3").to_hf()
  assert hf_cfg["architectures"] == ["DeepseekV3ForSequenceClassification"]
  assert ModelConfig.from_hf(dict(hf_cfg, num_nextn_predict_layers=1)).num_labels == 1
  del hf_cfg["id2label"], hf_cfg["label2id"]
  assert ModelConfig.from_hf(hf_cfg).num_labels == 2
  lm = ModelConfig.from_config(FAMILIES["llama"]).to_hf()
  assert lm["architectures"] == ["LlamaForCausalLM"] and "id2label" not in lm
  assert ModelConfig.from_hf(dict(lm, num_labels=3)).num_labels == 0


def test_lm_head_paths_refuse_a_classifier():
  cfg = classifier("llama")
  params = testing.random_params(cfg)
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ConfigError, match="model.forward needs an LM head"):
    model.forward(params, tokens, cfg)
  with pytest.raises(ConfigError, match="model.target_logprobs needs an LM head"):
    model.target_logprobs(params, tokens, tokens, cfg)
  lm = dataclasses.replace(cfg, num_labels=0)
  with pytest.raises(ConfigError, match="num_labels=0"):
    model.reward_scores(testing.random_params(lm), tokens, lm, last=jnp.zeros(1, jnp.int32))


def test_init_counts_and_flops():
  """model.init draws `score` like the other projections; parameter and FLOP counts take it
  in place of the LM head; a tied classifier does not count the embedding as a head."""
  cfg = classifier("llama", num_labels=3)
  lm = dataclasses.replace(cfg, num_labels=0)
  D, V = cfg.hidden_size, cfg.vocab_size
  params = model.init(cfg, jax.random.key(0))
  assert params["score"].shape == (D, 3) and "lm_head" not in params
  assert 0.01 < float(jnp.std(params["score"])) < 0.04  # normal(0, initializer_range 0.02)
  assert model.num_params(cfg) == model.num_params(lm) - D * V + D * 3
  assert (flops.matmul_params_per_token(cfg) ==
          flops.matmul_params_per_token(lm) - D * V + D * 3)
  tied = classifier("qwen2")
  tied_lm = dataclasses.replace(tied, num_labels=0)
  assert (flops.matmul_params_per_token(tied) ==
          flops.matmul_params_per_token(tied_lm) - tied.vocab_size * tied.hidden_size
          + tied.hidden_size)


def test_scores_on_a_mesh_equal_one_device(checkpoints):
  """The score head's (embed, unsharded) axes shard on an 8-device mesh (FSDP x tensor x data)
  and the sharded scores equal the single-device ones."""
  ck = checkpoints("llama")
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  spec = parallel.param_specs(ck.cfg, mesh)["score"]
  assert spec[1] is None and spec[0] is not None
  with jax.set_mesh(mesh):
    params = parallel.shard_params(ck.params, ck.cfg, mesh)
    tokens, real = parallel.shard_batch((ck.tokens, ck.real), mesh)
    last = parallel.shard_batch(np.asarray(LENGTHS, np.int32) - 1, mesh)
    sharded, _ = jax.jit(lambda p, t, l, m: model.reward_scores(
        p, t, ck.cfg, last=l, token_mask=m))(params, tokens, last, real)
  single = our_scores(ck.cfg, ck.params, ck.tokens, ck.real, np.asarray(LENGTHS) - 1)
  np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5, atol=1e-5)
