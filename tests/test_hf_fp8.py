"""Loading a DeepSeek-V3 FP8 release-format checkpoint: e4m3 128x128 blocks with
`weight_scale_inv`, bf16 norms/router/embeddings/head, fp32 correction bias, and the hub's MTP
layer (`model.layers.{num_hidden_layers}.*`) stored beside the main layers."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hf_testing as H
from r1jax import hf

BLOCK = 128
FP8_MAX = 448.0
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK]}


def is_quantized(key: str, t: torch.Tensor) -> bool:
  """Linear weights are FP8 in the release; norms, router, embeddings and heads are not."""
  keep = ("norm.weight", "mlp.gate.weight", "embed_tokens.weight", "lm_head.weight",
          "shared_head.head.weight")
  return key.endswith(".weight") and t.ndim == 2 and not key.endswith(keep)


def quantize_blocks(w: torch.Tensor):
  """[out, in] fp32 -> (e4m3 [out, in], fp32 scale_inv [ceil(out/128), ceil(in/128)])."""
  rows, cols = w.shape
  nr, nc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
  padded = torch.zeros(nr * BLOCK, nc * BLOCK)
  padded[:rows, :cols] = w
  blocks = padded.reshape(nr, BLOCK, nc, BLOCK)
  scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
  q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
  q = q.reshape(nr * BLOCK, nc * BLOCK)[:rows, :cols].to(torch.float8_e4m3fn)
  return q.contiguous(), scale.float()


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
  s = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
  return q.float() * s[:q.shape[0], :q.shape[1]]


def mtp_tensors(hf_tensors: dict, cfg, g: torch.Generator) -> dict:
  """A hub-style MTP layer at index L: a copy-shaped MLA + MoE block with fresh values, plus
  enorm/hnorm/eh_proj/shared_head and the duplicated embedding and head."""
  L, D = cfg.num_hidden_layers, cfg.hidden_size
  src = f"model.layers.{L - 1}."
  out = {}
  for k, t in hf_tensors.items():
    if k.startswith(src):
      noise = torch.randn(t.shape, generator=g)
      out[f"model.layers.{L}." + k[len(src):]] = (
          1 + 0.1 * noise if k.endswith("norm.weight") else 0.1 * noise).to(t.dtype)
  p = f"model.layers.{L}."
  out[p + "enorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
  out[p + "hnorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
  out[p + "eh_proj.weight"] = 0.1 * torch.randn(D, 2 * D, generator=g)
  out[p + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
  out[p + "embed_tokens.weight"] = hf_tensors["model.embed_tokens.weight"].clone()
  out[p + "shared_head.head.weight"] = hf_tensors["lm_head.weight"].clone()
  return out


def write_checkpoint(path, config: dict, tensors: dict):
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
            metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(config))
  return str(path)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
  """(fp8 dir, dequantized fp32 dir, float model loaded from the dequantized dir, tokens,
  scale_inv shapes)."""
  # hidden 160 and widths 192 / 136: partial 128-blocks and several blocks per dim
  hf_cfg = H.deepseek_config(vocab_size=128, hidden_size=160, intermediate_size=192,
                             moe_intermediate_size=136, num_attention_heads=2,
                             num_key_value_heads=2, q_lora_rank=48, kv_lora_rank=32,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                             n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                             first_k_dense_replace=1, num_hidden_layers=2)
  m = H.make_model(hf_cfg, seed=7, bias_scale=0.2)
  base = tmp_path_factory.mktemp("fp8_src")
  H.save_model(m, base)
  config = json.loads((base / "config.json").read_text())
  config["num_nextn_predict_layers"] = 1
  g = torch.Generator().manual_seed(11)
  tensors = load_file(str(base / "model.safetensors"))
  tensors.update(mtp_tensors(tensors, m.config, g))

  fp8, deq, shapes = {}, {}, {}
  for k, t in tensors.items():
    if is_quantized(k, t):
      q, s = quantize_blocks(t.float())
      fp8[k], fp8[k + "_scale_inv"] = q, s
      deq[k] = dequantize_blocks(q, s)
      shapes[k] = (tuple(t.shape), tuple(s.shape))
    elif k.endswith("e_score_correction_bias"):
      fp8[k] = deq[k] = t.float()
    else:  # bf16 in the release
      fp8[k] = t.to(torch.bfloat16)
      deq[k] = fp8[k].float()
  fp8_dir = write_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt",
                             dict(config, quantization_config=QUANT_CONFIG), fp8)
  deq_dir = write_checkpoint(tmp_path_factory.mktemp("deq") / "ckpt", config, deq)
  # transformers' reference: the dequantized weights in a float model (it ignores the MTP layer)
  ref_dir = write_checkpoint(tmp_path_factory.mktemp("ref") / "ckpt", config,
                             {k: v for k, v in deq.items()
                              if not k.startswith(f"model.layers.{m.config.num_hidden_layers}.")})
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      ref_dir, dtype=torch.float32, attn_implementation="eager").eval()
  tokens = H.random_tokens(128, 2, 32, seed=3)
  return dict(fp8_dir=fp8_dir, deq_dir=deq_dir, ref_model=ref_model, tokens=tokens,
              shapes=shapes, tensors=tensors, deq=deq)


def test_fixture_is_a_meaningful_fp8_checkpoint(fp8_checkpoint):
  shapes = fp8_checkpoint["shapes"]
  assert any(s[0] % BLOCK for s, _ in shapes.values()), "no partial block"
  assert any(b[0] > 1 and b[1] > 1 for _, b in shapes.values()), "no weight with 2x2 blocks"
  assert "model.layers.2.eh_proj.weight" in shapes  # the MTP layer is quantized too
  # quantization is lossy: the reference is not simply the original weights
  k = "model.layers.1.mlp.experts.0.gate_proj.weight"
  assert H.max_err(fp8_checkpoint["deq"][k], fp8_checkpoint["tensors"][k]) > 1e-4
  with open(f"{fp8_checkpoint['fp8_dir']}/model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header[k]["dtype"] == "F8_E4M3" and header[k + "_scale_inv"]["dtype"] == "F32"
  assert header["model.embed_tokens.weight"]["dtype"] == "BF16"


def test_fp8_params_equal_dequantized_weights(fp8_checkpoint):
  cfg, params = hf.load(fp8_checkpoint["fp8_dir"], dtype=jnp.float32)
  cfg_ref, params_ref = hf.load(fp8_checkpoint["deq_dir"], dtype=jnp.float32)
  assert cfg == cfg_ref and cfg.num_nextn_predict_layers == 1 and "mtp" in params
  # block * scale_inv is one fp32 rounding on both sides: bit-identical
  jax.tree.map(np.testing.assert_array_equal, params, params_ref)
  # spot-check a leaf against the test's own dequantization, through the [out, in] transpose
  k = "model.layers.1.mlp.experts.3.down_proj.weight"
  np.testing.assert_array_equal(np.asarray(params["moe_layers"]["moe"]["down"][0, 3]),
                                fp8_checkpoint["deq"][k].numpy().T)
  np.testing.assert_array_equal(np.asarray(params["mtp"]["eh_proj"][0]),
                                fp8_checkpoint["deq"]["model.layers.2.eh_proj.weight"].numpy().T)


def test_fp8_logits_equal_transformers_on_dequantized_weights(fp8_checkpoint):
  cfg, params = hf.load(fp8_checkpoint["fp8_dir"], dtype=jnp.float32)
  tokens = fp8_checkpoint["tokens"]
  ref = H.hf_logits(fp8_checkpoint["ref_model"], tokens)
  assert np.abs(ref).max() > 0.5
  err = H.max_err(H.our_logits(cfg, params, tokens), ref)
  assert err < 1e-4, f"max abs logit error {err}"
