"""Qwen3 (dense): logits against transformers' Qwen3ForCausalLM on tiny random checkpoints (per-head
q/k RMSNorm, GQA, head_dim apart from hidden / heads, tied and untied embeddings), the
hf.load -> hf.save -> from_pretrained round trip, KV-cache decoding against a full forward, LoRA's
merged export, and a GRPO run through the launcher (configs/grpo_qwen3_tiny.py, shrunk).
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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      m = H.make_model(H.qwen3_config(**CASES[name]), seed=len(cache) + 3)
      path = H.save_model(m, tmp_path_factory.mktemp(name))
      tokens = H.random_tokens(m.config.vocab_size, 2, 40, seed=len(cache))
      cache[name] = (m, path, tokens, H.hf_logits(m, tokens))
    return cache[name]

  return get


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


def test_grpo_run_through_the_launcher(tmp_path):
  """configs/grpo_qwen3_tiny.py, every stage at 2 steps: SFT, then GRPO (rollout with the KV
  cache, rewards, update), exactly on-policy at the first update."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.launch", "--config",
       os.path.join(ROOT, "configs", "grpo_qwen3_tiny.py"), "--workdir", str(workdir),
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
