"""Qwen3 and Qwen3-MoE against transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM on tiny random
checkpoints.

Qwen3: logits (per-head q/k RMSNorm, GQA, head_dim apart from hidden / heads, tied and untied
embeddings), the hf.load -> hf.save -> from_pretrained round trip, KV-cache decoding against a full
forward, LoRA's merged export. Qwen3-MoE: logits with norm_topk_prob on and off and with
decoder_sparse_step / mlp_only_layers interleaving dense and MoE layers (and negative controls),
the dropless expert paths, round trip, KV-cache decoding with recorded routing (R3), expert
parallelism on 8 simulated devices against one. Both: a GRPO run through the launcher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_testing as H
import testing
from r1jax import hf, model
from r1jax.model import lora
from r1jax.rollout import sampler

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"untied": dict(tie_word_embeddings=False),
         "tied": dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=24)}


def _checkpoint_factory(tmp_path_factory, make_config, cases):
  """get(name) -> (transformers model, its saved dir, tokens, its logits), built once per case.
  `cases` maps a name to (config overrides, model seed, token seed): fixed per case, so a
  case's weights do not depend on which tests ran first."""
  cache = {}

  def get(name):
    if name not in cache:
      overrides, seed, token_seed = cases[name]
      m = H.make_model(make_config(**overrides), seed=seed)
      path = H.save_model(m, tmp_path_factory.mktemp(name))
      tokens = H.random_tokens(m.config.vocab_size, 2, 40, seed=token_seed)
      cache[name] = (m, path, tokens, H.hf_logits(m, tokens))
    return cache[name]

  return get


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return _checkpoint_factory(tmp_path_factory, H.qwen3_config,
                             {"untied": (CASES["untied"], 3, 0), "tied": (CASES["tied"], 4, 1)})


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, name):
  m, path, tokens, ref = checkpoints(name)
  cfg, params = hf.load(path, dtype=jnp.float32)
  assert cfg.model_type == "qwen3" and cfg.qk_norm and not cfg.attention_bias
  assert cfg.tie_word_embeddings == CASES[name]["tie_word_embeddings"]
  assert cfg.dense_head_dim != cfg.hidden_size // cfg.num_attention_heads
  # the q/k norms were read (randomized around 1, so a missed or swapped one moves the logits)
  qn, kn = (np.asarray(params["layers"]["attn"][n]) for n in ("q_norm", "k_norm"))
  assert qn.shape == kn.shape == (2, cfg.dense_head_dim) and not np.allclose(qn, kn)
  assert np.abs(ref).max() > 0.5
  err = H.max_err(H.our_logits(cfg, params, tokens), ref)
  assert err < TOL, f"{name}: max abs logit error {err}"


def test_without_qk_norm_the_logits_differ(checkpoints):
  """Negative control: the same weights read as Qwen2 (no q/k norm) miss the reference."""
  m, path, tokens, ref = checkpoints("untied")
  cfg, params = hf.load(path, dtype=jnp.float32)
  cfg2 = cfg.replace(model_type="llama")
  attn = {k: v for k, v in params["layers"]["attn"].items() if k not in ("q_norm", "k_norm")}
  params2 = dict(params, layers=dict(params["layers"], attn=attn))
  assert H.max_err(H.our_logits(cfg2, params2, tokens), ref) > 100 * TOL


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_through_transformers(checkpoints, tmp_path, name):
  """hf.load -> hf.save -> transformers.from_pretrained gives the original logits, and
  loading the saved dir again gives bit-identical parameters."""
  m, path, tokens, ref = checkpoints(name)
  cfg, params = hf.load(path, dtype=jnp.float32)
  hf.save(str(tmp_path), cfg, params)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
      "Qwen3ForCausalLM"]
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert type(reloaded).__name__ == "Qwen3ForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  err = H.max_err(H.hf_logits(reloaded.eval(), tokens), ref)
  assert err < TOL, f"round trip: max abs logit error {err}"
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_kv_cache_decoding_equals_full_forward(checkpoints):
  """The sampler's cached decode (q/k norms applied to new tokens only, cached keys already
  normed and rotated) gives the log-probs of a full forward over the generated sequences."""
  m, path, _, _ = checkpoints("untied")
  cfg, params = hf.load(path, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (3, 9, 6, 12)]
  n_new = 8
  out = sampler.generate(params, cfg, prompts, max_new_tokens=n_new, eos_id=None,
                         rng=jax.random.key(0), compiler_options=testing.FAST_COMPILE)
  assert out.completion_mask.all()
  seqs = [list(p) + list(c) for p, c in zip(prompts, out.completion)]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for row, s in enumerate(seqs):
    batch[row, :len(s)] = s
  logp = np.asarray(jax.nn.log_softmax(H.our_logits(cfg, params, batch), axis=-1))
  ref = np.stack([logp[row, len(p) - 1 + np.arange(n_new), out.completion[row]]
                  for row, p in enumerate(prompts)])
  np.testing.assert_allclose(out.logprobs, ref, atol=1e-4, rtol=0)
  assert ref.std() > 0.1


def test_lora_merged_export_equals_unmerged_and_transformers(checkpoints, tmp_path):
  m, path, tokens, _ = checkpoints("tied")
  cfg, params = hf.load(path, dtype=jnp.float32)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init(cfg, lcfg, params, jax.random.key(1))
  # the norms are not projections: only q/k/v/o and the MLP are adapted
  assert set(adapters["layers"]["attn"]) == {"q", "k", "v", "o"}
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.1 * jax.random.normal(jax.random.key(2), x.shape)
                    if jax.tree_util.keystr(p).endswith("['b']") else x), adapters)
  merged = lora.merge(params, adapters, lcfg)
  ours = H.our_logits(cfg, merged, tokens)
  assert H.max_err(ours, H.our_logits(cfg, params, tokens)) > 1e-2  # the adapters matter
  lora.export(str(tmp_path), cfg, params, adapters, lcfg)
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
  assert H.max_err(H.hf_logits(exported, tokens), ours) < TOL


@pytest.mark.parametrize("config", ["grpo_qwen3_tiny", "grpo_qwen3_moe_tiny"])
def test_grpo_run_through_the_launcher(tmp_path, config):
  """configs/grpo_qwen3[_moe]_tiny.py, every stage at 2 steps: SFT, then GRPO (rollout with the
  KV cache, rewards, update), exactly on-policy at the first update."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.launch", "--config",
       os.path.join(ROOT, "configs", f"{config}.py"), "--workdir", str(workdir),
       "--config.max_steps=2", "--config.data.num_eval_problems=4",
       "--config.stages.grpo.prompts_per_step=4", "--config.stages.grpo.group_size=4",
       "--config.log.every_steps=1", "--config.log.plots=False",
       "--config.log.tensorboard=False"],
      cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert [s["name"] for s in summary["stages"]] == ["sft", "grpo"]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  grpo = [r for r in rows if r.get("stage") == "grpo" and "reward" in r]
  assert len(grpo) == 2 and all(np.isfinite(r["loss"]) for r in grpo)
  assert abs(grpo[0]["mismatch_ratio_max"] - 1) < 1e-5 and grpo[0]["mismatch_clip_frac"] == 0
  if "moe" in config:
    assert grpo[0]["moe_drop_frac"] == 0


# ------------------------------------------------------------------ Qwen3-MoE
# "sparse": every layer has experts, top-k weights renormalized; "interleaved": experts in the
# layers (i + 1) % 2 == 0 except mlp_only_layers=[3] (dense, MoE, dense x3, MoE: the stacks are
# scanned in four runs), raw softmax weights (norm_topk_prob off), tied embeddings
MOE_CASES = {
    "sparse": dict(norm_topk_prob=True),
    "interleaved": dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                        norm_topk_prob=False, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
  return _checkpoint_factory(tmp_path_factory, H.qwen3_moe_config,
                             {"interleaved": (MOE_CASES["interleaved"], 7, 1),
                              "sparse": (MOE_CASES["sparse"], 8, 2)})


def test_moe_settings_reach_our_config(moe_checkpoints):
  cfg, params = hf.load(moe_checkpoints("interleaved")[1])
  assert (cfg.model_type, cfg.attention, cfg.is_moe, cfg.qk_norm) == ("qwen3_moe", "gqa", True,
                                                                      True)
  assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (8, 2, 0)
  assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", False)
  assert cfg.layer_runs == (("dense_layers", 0, 1), ("moe_layers", 0, 1),
                            ("dense_layers", 1, 3), ("moe_layers", 1, 1))
  assert params["moe_layers"]["moe"]["gate"].shape == (2, 8, 48, 24)
  assert params["dense_layers"]["mlp"]["gate"].shape == (4, 48, 80)
  assert "shared" not in params["moe_layers"]["moe"] and "lm_head" not in params
  cfg, _ = hf.load(moe_checkpoints("sparse")[1])
  assert cfg.layer_runs == (("moe_layers", 0, 4),) and cfg.norm_topk_prob


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_logits_match_transformers(moe_checkpoints, name):
  m, path, tokens, ref = moe_checkpoints(name)
  cfg, params = hf.load(path, dtype=jnp.float32)
  assert np.abs(ref).max() > 0.5
  logits, aux = H.our_logits_aux(cfg, params, tokens)
  assert float(aux["dropped"]) == 0 and aux["expert_counts"].shape == (cfg.num_moe_layers, 8)
  err = H.max_err(logits, ref)
  assert err < TOL, f"{name}: max abs logit error {err}"


def test_moe_routing_settings_matter(moe_checkpoints):
  """Negative controls: renormalizing the top-k weights, or putting the MoE layers first
  (DeepSeek's layout for the same stacks), misses the reference."""
  m, path, tokens, ref = moe_checkpoints("interleaved")
  cfg, params = hf.load(path, dtype=jnp.float32)
  assert H.max_err(H.our_logits(cfg.replace(norm_topk_prob=True), params, tokens), ref) > 1e-2
  first = cfg.replace(mlp_only_layers=(0, 1, 2, 3), decoder_sparse_step=1)
  assert first.layer_runs == (("dense_layers", 0, 4), ("moe_layers", 0, 2))
  assert H.max_err(H.our_logits(first, params, tokens), ref) > 1e-2


@pytest.mark.parametrize("impl", ["capacity", "blocked"])
def test_moe_dropless_expert_paths_match_transformers(moe_checkpoints, impl):
  m, path, tokens, ref = moe_checkpoints("interleaved")
  cfg, params = hf.load(path, dtype=jnp.float32, moe_impl=impl)
  assert cfg.moe_impl == impl and cfg.capacity_factor is None
  logits, aux = H.our_logits_aux(cfg, params, tokens)
  assert float(aux["dropped"]) == 0
  assert H.max_err(logits, ref) < TOL


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_round_trip_through_transformers(moe_checkpoints, tmp_path, name):
  m, path, tokens, ref = moe_checkpoints(name)
  cfg, params = hf.load(path, dtype=jnp.float32)
  hf.save(str(tmp_path), cfg, params)
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert H.max_err(H.hf_logits(reloaded.eval(), tokens), ref) < TOL
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_moe_kv_cache_decoding_equals_full_forward(moe_checkpoints):
  m, path, _, _ = moe_checkpoints("interleaved")
  cfg, params = hf.load(path, dtype=jnp.float32)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (4, 10, 7, 13)]
  n_new = 8
  out = sampler.generate(params, sampler.policy_config(cfg), prompts, max_new_tokens=n_new,
                         eos_id=None, rng=jax.random.key(0), record_routing=True,
                         compiler_options=testing.FAST_COMPILE)
  seqs = [list(p) + list(c) for p, c in zip(prompts, out.completion)]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for row, s in enumerate(seqs):
    batch[row, :len(s)] = s
  logits, aux = H.our_logits_aux(cfg, params, batch)
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  ref = np.stack([logp[row, len(p) - 1 + np.arange(n_new), out.completion[row]]
                  for row, p in enumerate(prompts)])
  np.testing.assert_allclose(out.logprobs, ref, atol=1e-4, rtol=0)
  # the recorded experts (R3) are the full forward's, for the two MoE layers in order
  P = out.tokens.shape[1] - n_new
  ids = np.asarray(aux["expert_ids"])  # [L_moe, B, T, k]
  for row, p in enumerate(prompts):
    got = np.asarray(out.routing)[row, P:P + n_new - 1]  # [n, L_moe, k] of the completion
    want = ids[:, row, len(p):len(p) + n_new - 1].transpose(1, 0, 2)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))


@pytest.mark.parametrize("dispatch,mesh_cfg", [
    ("allgather", {"data": 2, "expert": 4}), ("all_to_all", {"data": 2, "expert": 4}),
    ("all_to_all", {"data": 2, "expert": 2, "context": 2})])
def test_moe_expert_parallel_equals_one_device(moe_checkpoints, dispatch, mesh_cfg):
  """2-way data x 4-way expert mesh (8 simulated devices), and 2 x 2 x 2 with context
  parallelism (GQA gathers k and v): the same logits as one device."""
  from r1jax import parallel
  m, path, tokens, ref = moe_checkpoints("interleaved")
  cfg, params = hf.load(path, dtype=jnp.float32, expert_dispatch=dispatch,
                        moe_impl="capacity")
  mesh = parallel.make_mesh(mesh_cfg)
  sharded = parallel.shard_params(params, cfg, mesh)
  gate = sharded["moe_layers"]["moe"]["gate"]
  assert gate.addressable_shards[0].data.shape[1] == 8 // mesh_cfg["expert"]
  batch = np.concatenate([tokens, tokens[::-1]], 0)  # 4 rows: 2 per data shard
  with jax.set_mesh(mesh):
    logits = testing.jit(lambda p, t: model.forward(p, t, cfg))(
        sharded, parallel.shard_batch({"tokens": jnp.asarray(batch)}, mesh)["tokens"])
  single = H.our_logits(cfg.replace(expert_dispatch="allgather"), params, batch)
  assert len(logits.sharding.device_set) == 8
  if "context" in mesh_cfg:
    assert logits.sharding.spec[1] == "context", logits.sharding.spec
  np.testing.assert_allclose(np.asarray(logits), single, rtol=0, atol=1e-5)
  assert H.max_err(single[:2], ref) < TOL
