"""Our float32 logits vs transformers' on tiny random checkpoints, HF round trips, packing and
causal masking."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_testing as H
from r1jax import hf, model
from r1jax.model import moe as moe_lib

TOL = 1e-4

# name -> (HF config kwargs, correction-bias scale, sequence length)
DEEPSEEK_CASES = {
    # q-LoRA, 4 groups keep 2, YaRN (factor 4) with positions up to 95 > original 32,
    # mscale != mscale_all_dim so the cos/sin attention factor is not 1, one dense layer
    "qlora_groups_yarn": (dict(rope={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 32,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                     "mscale_all_dim": 0.8},
                               max_position_embeddings=128), 0.3, 96),
    # direct q projection, one group, unnormalized top-k weights, no dense layer
    "direct_q_group1_nonorm": (dict(q_lora_rank=None, n_group=1, topk_group=1,
                                    norm_topk_prob=False, routed_scaling_factor=1.0,
                                    first_k_dense_replace=0), 0.3, 48),
    # two dense layers then one MoE layer, V2-Lite style YaRN (mscale == mscale_all_dim)
    "dense2_yarn_v2lite": (dict(num_hidden_layers=3, first_k_dense_replace=2, n_group=2,
                                topk_group=1, num_experts_per_tok=3,
                                rope={"rope_type": "yarn", "factor": 2.0,
                                      "original_max_position_embeddings": 24, "mscale": 0.707,
                                      "mscale_all_dim": 0.707},
                                max_position_embeddings=48), 0.0, 48),
}
# DeepSeek-V2 (V2-Lite style): softmax scores, greedy top-k, no correction bias, 2 shared experts
V2_CASE = dict(rope={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 24,
                     "mscale": 0.707, "mscale_all_dim": 0.707}, max_position_embeddings=48)
QWEN_CASES = {"untied": dict(tie_word_embeddings=False), "tied": dict(tie_word_embeddings=True)}
# Llama with the rope scalings of the R1-Distill-Llama students (Llama 3.1's "llama3") and linear
# interpolation. Head dim 16 at theta 1e4: wavelengths 6.3, 20, 63, 199, ... so with an original
# context of 64 one band keeps its frequency, two are blended and the rest divided by the factor;
# the 96-token rows reach past the original context.
LLAMA_CASES = {
    "llama3_rope": dict(rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear_rope": dict(rope={"rope_type": "linear", "factor": 2.0}),
}
# Correction biases uniform in [-0.9, -0.5), where aux-loss-free updates can drive them: with
# sigmoid scores in ~(0.2, 0.8) many selection scores are negative, and the score given to the
# dropped groups' experts (router_group_fill) decides selections. 16 experts, 4 groups keep 2.
NEGATIVE_BIAS_CASE = dict(n_routed_experts=16, num_experts_per_tok=4)
NEGATIVE_BIAS_OFFSET, NEGATIVE_BIAS_SCALE = -0.9, 0.4


class Checkpoint:
  """A transformers model saved to `path`, the test tokens and its logits on them."""

  def __init__(self, hf_model, path, tokens):
    self.hf_model = hf_model
    self.path = H.save_model(hf_model, path)
    self.tokens = tokens
    self.ref = H.hf_logits(hf_model, tokens)
    self._loaded = None

  def load(self):
    """hf.load of the checkpoint with default settings (cached: tests must not mutate it)."""
    if self._loaded is None:
      self._loaded = hf.load(self.path, dtype=jnp.float32)
    return self._loaded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      if name in DEEPSEEK_CASES:
        kw, bias, T = DEEPSEEK_CASES[name]
        m = H.make_model(H.deepseek_config(**kw), seed=len(cache), bias_scale=bias)
      elif name == "negative_bias":
        # a fixed seed (not the fixture's order-dependent one): the test counts changed tokens
        m = H.make_model(H.deepseek_config(**NEGATIVE_BIAS_CASE), seed=11,
                         bias_scale=NEGATIVE_BIAS_SCALE, bias_offset=NEGATIVE_BIAS_OFFSET)
        T = 32
      elif name == "deepseek_v2":
        m = H.make_model(H.deepseek_v2_config(**V2_CASE), seed=len(cache))
        T = 48
      elif name in LLAMA_CASES:
        m = H.make_model(H.llama_config(**LLAMA_CASES[name]), seed=len(cache))
        T = 96
      else:
        m = H.make_model(H.qwen2_config(**QWEN_CASES[name]), seed=len(cache))
        T = 40
      tokens = H.random_tokens(m.config.vocab_size, 2, T, seed=len(cache))
      cache[name] = Checkpoint(m, tmp_path_factory.mktemp(name), tokens)
    return cache[name]

  return get


@pytest.mark.parametrize("name", list(DEEPSEEK_CASES) + ["deepseek_v2"] + list(QWEN_CASES)
                         + list(LLAMA_CASES))
def test_logits_match_transformers(checkpoints, name):
  ck = checkpoints(name)
  cfg, params = ck.load()
  assert cfg.model_type == ck.hf_model.config.model_type
  # the reference must be far from trivial for the tolerance to mean anything
  assert np.abs(ck.ref).max() > 0.5
  logits, aux = H.our_logits_aux(cfg, params, ck.tokens)
  if cfg.is_moe:
    assert cfg.moe_impl == "ragged_dot" and float(aux["dropped"]) == 0
  err = H.max_err(logits, ck.ref)
  assert err < TOL, f"{name}: max abs logit error {err}"


def test_case_settings_reach_our_config(checkpoints):
  """The parity cases really exercise what they claim (guards against a silently ignored field)."""
  cfg, _ = hf.load(checkpoints("qlora_groups_yarn").path)
  assert (cfg.q_lora_rank, cfg.n_group, cfg.topk_group, cfg.rope_type, cfg.rope_factor,
          cfg.original_max_position_embeddings, cfg.mscale_all_dim) == (24, 4, 2, "yarn", 4.0,
                                                                         32, 0.8)
  assert checkpoints("qlora_groups_yarn").tokens.shape[1] > cfg.original_max_position_embeddings
  cfg, params = hf.load(checkpoints("direct_q_group1_nonorm").path)
  assert cfg.q_lora_rank is None and cfg.n_group == 1 and not cfg.norm_topk_prob
  assert cfg.num_dense_layers == 0 and "q" in params["moe_layers"]["attn"]
  cfg, params = hf.load(checkpoints("dense2_yarn_v2lite").path)
  assert cfg.num_dense_layers == 2 and cfg.num_moe_layers == 1
  assert params["dense_layers"]["mlp"]["gate"].shape[0] == 2
  cfg, params = hf.load(checkpoints("deepseek_v2").path)
  assert (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.num_nextn_predict_layers) == (
      "softmax", "greedy", 1, 0)
  # no correction bias in a V2 checkpoint: the unused leaf must be defined (zeros)
  np.testing.assert_array_equal(params["moe_layers"]["moe"]["router_bias"], 0)
  cfg, params = hf.load(checkpoints("untied").path)
  assert cfg.kv_heads < cfg.num_attention_heads and cfg.attention_bias
  for b in ("q_bias", "k_bias", "v_bias"):
    assert np.abs(np.asarray(params["layers"]["attn"][b])).min() > 0, b
  cfg, params = hf.load(checkpoints("tied").path)
  assert cfg.tie_word_embeddings and "lm_head" not in params


@pytest.mark.parametrize("name", list(LLAMA_CASES))
def test_rope_scaling_reaches_our_config_and_matters(checkpoints, name):
  """The Llama cases' rope scaling is read (not silently dropped to the default rope), and with
  the default rope instead the logits move far past the tolerance: the parity above tests it."""
  ck = checkpoints(name)
  cfg, params = ck.load()
  rope = LLAMA_CASES[name]["rope"]
  assert (cfg.model_type, cfg.rope_type, cfg.rope_factor) == ("llama", rope["rope_type"],
                                                              rope["factor"])
  if name == "llama3_rope":
    assert (cfg.original_max_position_embeddings, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor) == (64, 1.0, 4.0)
  plain, _ = H.our_logits_aux(cfg.replace(rope_type="default"), params, ck.tokens)
  assert H.max_err(plain, ck.ref) > 100 * TOL


def _router_inputs(ck, cfg, params):
  """Per MoE layer of transformers' forward on ck.tokens: (router logits [N, E] and correction
  bias [E], both computed with our params, and transformers' expert ids [N, k])."""
  captured = []

  def hook(module, inputs, outputs):
    captured.append((inputs[0].detach().reshape(-1, cfg.hidden_size).numpy(),
                     outputs[2].detach().numpy()))

  gates = [layer.mlp.gate for layer in ck.hf_model.model.layers
           if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]
  handles = [g.register_forward_hook(hook) for g in gates]
  try:
    H.hf_logits(ck.hf_model, ck.tokens)
  finally:
    for h in handles:
      h.remove()
  assert len(captured) == cfg.num_moe_layers
  moe = params["moe_layers"]["moe"]
  return [(jnp.asarray(x) @ moe["router"][j], moe["router_bias"][j], hf_ids)
          for j, (x, hf_ids) in enumerate(captured)]


@pytest.mark.parametrize("name", ["qlora_groups_yarn", "direct_q_group1_nonorm"])
def test_correction_bias_changes_selection(checkpoints, name):
  """The nonzero e_score_correction_bias changes which experts are picked on the real router
  inputs, and our selection with the bias equals transformers' in every MoE layer."""
  ck = checkpoints(name)
  cfg, params = ck.load()
  route = jax.jit(lambda logits, bias: moe_lib.route(logits, bias, cfg)[1])
  changed = 0
  for logits, bias, hf_ids in _router_inputs(ck, cfg, params):
    assert float(jnp.abs(bias).max()) > 0.05
    ids, ids_nobias = route(logits, bias), route(logits, jnp.zeros_like(bias))
    np.testing.assert_array_equal(np.sort(np.asarray(ids), 1), np.sort(hf_ids, 1))
    changed += int(np.any(np.sort(np.asarray(ids), 1) != np.sort(np.asarray(ids_nobias), 1),
                          axis=1).sum())
  assert changed > 0, "the correction bias changed no expert selection"


def _numpy_router_ids(logits, bias, cfg, fill):
  """Expert ids [N, k], sorted, of DeepSeek-V3's noaux_tc router written out in numpy: the
  dropped groups' experts get selection score `fill`; ties go to the lowest index."""
  logits, bias = np.asarray(logits, np.float32), np.asarray(bias, np.float32)
  N, E = logits.shape
  choice = 1 / (1 + np.exp(-logits)) + bias
  group_scores = np.sort(choice.reshape(N, cfg.n_group, -1), axis=-1)[..., -2:].sum(-1)
  kept = np.argsort(-group_scores, axis=1, kind="stable")[:, :cfg.topk_group]
  keep = np.zeros((N, cfg.n_group), bool)
  np.put_along_axis(keep, kept, True, axis=1)
  masked = np.where(np.repeat(keep, E // cfg.n_group, axis=1), choice, fill)
  return np.sort(np.argsort(-masked, axis=1, kind="stable")[:, :cfg.num_experts_per_tok], 1)


def test_negative_correction_bias_selection(checkpoints):
  """With most selection scores negative, the -inf fill (the default) picks what transformers'
  DeepseekV3 picks; the 0.0 fill picks experts of dropped groups on many tokens. Both of our
  fills equal a numpy transcription of their rule on every MoE layer's real router inputs."""
  ck = checkpoints("negative_bias")
  cfg, params = ck.load()
  assert cfg.router_group_fill == "neg_inf" and (cfg.n_group, cfg.topk_group) == (4, 2)
  fills = {"neg_inf": -np.inf, "zero": 0.0}
  routes = {f: jax.jit(lambda l, b, c=cfg.replace(router_group_fill=f): moe_lib.route(l, b, c)[1])
            for f in fills}
  tokens = changed = 0
  for logits, bias, hf_ids in _router_inputs(ck, cfg, params):
    assert float(((jax.nn.sigmoid(logits) + bias) < 0).mean()) > 0.3
    want = {f: _numpy_router_ids(logits, bias, cfg, v) for f, v in fills.items()}
    for f in fills:
      np.testing.assert_array_equal(np.sort(np.asarray(routes[f](logits, bias)), 1), want[f],
                                    err_msg=f)
    # transformers before huggingface/transformers#45441 filled 0.0 (and broke its ties in
    # torch's unspecified top-k order): this needs a release with the -inf fill
    np.testing.assert_array_equal(np.sort(hf_ids, 1), want["neg_inf"])
    tokens += len(hf_ids)
    changed += int(np.any(want["zero"] != want["neg_inf"], axis=1).sum())
  assert changed > 0.25 * tokens, f"the fills disagree on only {changed} of {tokens} tokens"


@pytest.mark.parametrize("group_fill", ["neg_inf", "zero"])
def test_negative_correction_bias_logits(checkpoints, group_fill):
  """router_group_fill reaches the forward: the default matches transformers within TOL, "zero"
  (its selections above) moves the logits far off."""
  ck = checkpoints("negative_bias")
  cfg, params = hf.load(ck.path, dtype=jnp.float32, router_group_fill=group_fill)
  assert cfg.router_group_fill == group_fill and np.abs(ck.ref).max() > 0.5
  err = H.max_err(H.our_logits(cfg, params, ck.tokens), ck.ref)
  if group_fill == "neg_inf":
    assert err < TOL, f"max abs logit error {err}"
  else:
    assert err > 0.1, f"max abs logit error {err}"


@pytest.mark.parametrize("impl", ["capacity", "dense"])  # ragged_dot: the default, above
def test_moe_impls_match_transformers(checkpoints, impl):
  ck = checkpoints("qlora_groups_yarn")
  cfg, params = hf.load(ck.path, moe_impl=impl, capacity_factor=None)
  assert cfg.moe_impl == impl and cfg.capacity_factor is None
  logits, aux = H.our_logits_aux(cfg, params, ck.tokens)
  assert float(aux["dropped"]) == 0
  err = H.max_err(logits, ck.ref)
  assert err < TOL, f"moe_impl={impl}: max abs logit error {err}"


@pytest.mark.parametrize("name,max_shard_bytes", [("qlora_groups_yarn", None),
                                                  ("qlora_groups_yarn", 60_000),
                                                  ("tied", 40_000), ("llama3_rope", None),
                                                  ("linear_rope", None)])
def test_round_trip_through_transformers(checkpoints, tmp_path, name, max_shard_bytes):
  """hf.load -> hf.save -> transformers.from_pretrained gives the original logits."""
  ck = checkpoints(name)
  cfg, params = ck.load()
  hf.save(str(tmp_path), cfg, params, max_shard_bytes=max_shard_bytes)
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  index = tmp_path / "model.safetensors.index.json"
  if max_shard_bytes is None:
    assert files == ["model.safetensors"] and not index.exists()
  else:
    assert len(files) >= 3 and index.exists()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == files
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  err = H.max_err(H.hf_logits(reloaded.eval(), ck.tokens), ck.ref)
  assert err < TOL, f"round trip: max abs logit error {err}"
  # and back into r1jax: bit-identical parameters
  cfg2, params2 = hf.load(str(tmp_path))
  # head_dim may become explicit (to_hf writes it); the head width itself must not change
  assert cfg2.dense_head_dim == cfg.dense_head_dim
  assert dataclasses.replace(cfg2, head_dim=None) == dataclasses.replace(cfg, head_dim=None)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name", ["qlora_groups_yarn", "untied"])
def test_packed_sequences_equal_separate_runs(checkpoints, name):
  """Two sequences packed in one row with segment_ids give the logits of separate runs."""
  ck = checkpoints(name)
  cfg, params = ck.load()
  la, lb = 20, 28
  a, b = ck.tokens[0, :la], ck.tokens[1, :lb]
  packed = np.concatenate([a, b])[None]
  segment_ids = np.array([[3] * la + [5] * lb], np.int32)
  got = H.our_logits(cfg, params, packed, segment_ids=segment_ids)
  # separate runs in one batch; row 0 is padded at the end, which causality makes harmless
  separate = H.our_logits(cfg, params, np.stack([np.concatenate([a, b[:lb - la]]), b]))
  assert H.max_err(got[0, :la], separate[0, :la]) < 1e-5
  assert H.max_err(got[0, la:], separate[1]) < 1e-5
  # without segment ids the second sequence attends to the first: different logits
  assert H.max_err(H.our_logits(cfg, params, packed)[0, la:], separate[1]) > 1e-2


@pytest.mark.parametrize("name", ["qlora_groups_yarn", "untied"])
def test_causal_masking(checkpoints, name):
  """Logits at positions <= t do not depend on tokens after t."""
  ck = checkpoints(name)
  cfg, params = ck.load()
  tokens = ck.tokens[:1, :48]
  t = 21
  changed = tokens.copy()
  changed[:, t + 1:] = (changed[:, t + 1:] + 1) % cfg.vocab_size
  before = H.our_logits(cfg, params, tokens)
  after = H.our_logits(cfg, params, changed)
  assert H.max_err(before[:, :t + 1], after[:, :t + 1]) < 1e-6
  assert H.max_err(before[:, t + 1:], after[:, t + 1:]) > 1e-2
