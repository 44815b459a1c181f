"""ModelConfig: validation errors, HF config.json spellings, the shipped configs, sizes, hashing."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from r1jax import model
from r1jax.model import num_params
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.errors import UserError

CONFIGS_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")

TINY_MOE = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                n_group=2, topk_group=1, num_nextn_predict_layers=0)
TINY_DENSE = dict(model_type="qwen2", vocab_size=64, hidden_size=48, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)

# The architecture fields of the hub's config.json files (transformers 4.x spelling), abridged
# to what ModelConfig reads plus a few fields it must ignore.
HUB_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False,
    "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16", "aux_loss_alpha": 0.001, "seq_aux": True,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
}
HUB_DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "rope_theta": 10000, "attention_bias": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
}
# fields that describe the checkpoint's architecture (not how we execute it)
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "rms_norm_eps", "tie_word_embeddings",
               "attention_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
               "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace",
               "n_group", "topk_group", "scoring_func", "topk_method", "norm_topk_prob",
               "routed_scaling_factor", "rope_theta", "rope_interleave", "rope_type",
               "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
               "mscale", "mscale_all_dim", "num_nextn_predict_layers")


def load_shipped(name: str) -> ModelConfig:
  path = os.path.join(CONFIGS_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return ModelConfig.from_config(mod.get_config().model)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("base,change,field", [
    (TINY_DENSE, dict(num_key_value_heads=4), "num_key_value_heads"),
    (TINY_DENSE, dict(num_attention_heads=5, num_key_value_heads=5), "num_attention_heads"),
    (TINY_MOE, dict(n_group=3), "n_group"),
    (TINY_MOE, dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (TINY_MOE, dict(topk_group=3), "topk_group"),
    (TINY_MOE, dict(hidden_size=0), "hidden_size"),
    (TINY_MOE, dict(vocab_size=-1), "vocab_size"),
    (TINY_MOE, dict(num_hidden_layers=0), "num_hidden_layers"),
    (TINY_MOE, dict(kv_lora_rank=0), "kv_lora_rank"),
    (TINY_MOE, dict(q_lora_rank=0), "q_lora_rank"),
    (TINY_MOE, dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (TINY_MOE, dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (TINY_MOE, dict(model_type="gpt2"), "model_type"),
    (TINY_MOE, dict(moe_impl="loop"), "moe_impl"),
    (TINY_MOE, dict(router_group_fill="-inf"), "router_group_fill"),
    (TINY_MOE, dict(remat="some"), "remat"),
    (TINY_MOE, dict(capacity_factor=0.0), "capacity_factor"),
    (TINY_MOE, dict(hiden_size=32), "hiden_size"),  # unknown field (typo)
    (TINY_DENSE, dict(rope_type="dynamic"), "rope_type"),
    (TINY_DENSE, dict(rope_type="linear", rope_factor=0.5), "rope_factor"),
    (TINY_DENSE, dict(rope_type="llama3", rope_low_freq_factor=4.0), "rope_low_freq_factor"),
])
def test_each_broken_rule_names_its_field(base, change, field):
  with pytest.raises(ConfigError, match=rf"^model\.{field}\b"):
    ModelConfig.from_config(dict(base, **change))


def test_valid_tiny_configs_pass():
  for base in (TINY_MOE, TINY_DENSE):
    cfg = ModelConfig.from_config(base)
    assert cfg == cfg.validate()


def test_config_errors_are_user_errors():
  assert issubclass(ConfigError, UserError)
  with pytest.raises(UserError):
    ModelConfig.from_config(dict(TINY_MOE, n_group=3))


def test_from_hf_rejects_unknown_model_type():
  with pytest.raises(ConfigError, match="model_type='gpt2'"):
    ModelConfig.from_hf(dict(HUB_DEEPSEEK_V3, model_type="gpt2"))
  with pytest.raises(ConfigError, match="model_type=None"):
    ModelConfig.from_hf({k: v for k, v in HUB_DEEPSEEK_V3.items() if k != "model_type"})


def test_from_hf_rope_scalings():
  """Llama 3.1's rope scaling (R1-Distill-Llama-8B's config.json values) and linear scaling are
  read, in transformers 4's `rope_scaling` and 5's `rope_parameters`; an incomplete llama3 entry
  and an unsupported type ("dynamic") are one clear error each."""
  llama = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=131072, rope_theta=500000.0)
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192, "rope_type": "llama3"}
  v4 = ModelConfig.from_hf(dict(llama, rope_scaling=scaling))
  v5 = ModelConfig.from_hf(dict(llama, rope_parameters=dict(scaling, rope_theta=500000.0)))
  assert v4 == v5
  assert (v4.rope_type, v4.rope_factor, v4.original_max_position_embeddings,
          v4.rope_low_freq_factor, v4.rope_high_freq_factor, v4.rope_theta) == (
              "llama3", 8.0, 8192, 1.0, 4.0, 500000.0)
  assert ModelConfig.from_hf(v4.to_hf()).replace(head_dim=None) == v4  # to_hf writes head_dim
  linear = ModelConfig.from_hf(dict(llama, rope_scaling={"type": "linear", "factor": 2.0}))
  assert (linear.rope_type, linear.rope_factor) == ("linear", 2.0)
  incomplete = {k: v for k, v in scaling.items() if k != "high_freq_factor"}
  with pytest.raises(ConfigError, match="llama3 rope scaling lacks high_freq_factor"):
    ModelConfig.from_hf(dict(llama, rope_scaling=incomplete))
  with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported"):
    ModelConfig.from_hf(dict(llama, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


def test_from_hf_reports_bad_field_types():
  with pytest.raises(ConfigError, match="hidden_size"):
    ModelConfig.from_hf(dict(HUB_DEEPSEEK_V3, hidden_size=[7168]))


# ------------------------------------------------------------- HF spellings
def _v5_spelling(hub: dict) -> dict:
  """The same config as transformers 5.x writes it: rope_parameters (with rope_theta), dtype."""
  d = {k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
  rope = dict(hub["rope_scaling"])
  rope["rope_type"] = rope.pop("type")
  d["rope_parameters"] = dict(rope, rope_theta=hub["rope_theta"])
  d["dtype"] = hub["torch_dtype"]
  return d


@pytest.mark.parametrize("hub", [HUB_DEEPSEEK_V3, HUB_DEEPSEEK_V2_LITE], ids=["v3", "v2_lite"])
def test_rope_scaling_and_rope_parameters_agree(hub):
  v4 = ModelConfig.from_hf(hub)
  v5 = ModelConfig.from_hf(_v5_spelling(hub))
  assert v4 == v5
  assert v4.rope_type == "yarn" and v4.rope_factor == 40.0
  assert v4.mscale == hub["rope_scaling"]["mscale"]
  assert v4.original_max_position_embeddings == 4096


def test_rope_spellings_agree_for_default_rope():
  qwen = dict(TINY_DENSE, rope_theta=1e6, rope_scaling=None)
  v5 = {k: v for k, v in qwen.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
  a, b = ModelConfig.from_hf(qwen), ModelConfig.from_hf(v5)
  assert a == b and a.rope_theta == 1e6 and a.rope_type == "default"


def test_from_hf_overrides_execution_fields():
  cfg = ModelConfig.from_hf(HUB_DEEPSEEK_V3, moe_impl="capacity", dtype="bfloat16")
  assert (cfg.moe_impl, cfg.dtype) == ("capacity", "bfloat16")
  with pytest.raises(ConfigError, match="moe_impl"):
    ModelConfig.from_hf(HUB_DEEPSEEK_V3, moe_impl="nope")


def test_router_group_fill_is_an_execution_field():
  """Default "neg_inf" (DeepSeek's rule); one line naming the field and its values otherwise;
  never written to config.json, so a saved checkpoint loads with the default again."""
  cfg = ModelConfig.from_hf(HUB_DEEPSEEK_V3)
  assert cfg.router_group_fill == "neg_inf"
  zero = ModelConfig.from_hf(HUB_DEEPSEEK_V3, router_group_fill="zero")
  assert zero.router_group_fill == "zero"
  assert "router_group_fill" not in zero.to_hf()
  assert ModelConfig.from_hf(zero.to_hf()).router_group_fill == "neg_inf"
  with pytest.raises(ConfigError) as e:
    ModelConfig.from_config(dict(TINY_MOE, router_group_fill="0.0"))
  assert str(e.value) == ("model.router_group_fill='0.0' is not one of ('neg_inf', 'zero')")
  with pytest.raises(ConfigError) as e:
    ModelConfig.from_config(dict(TINY_MOE, context_order="ring"))
  assert str(e.value) == "model.context_order='ring' is not one of ('zigzag', 'contiguous')"
  assert "context_order" not in zero.to_hf()


# ---------------------------------------------------------- shipped configs
# deepseek-ai/DeepSeek-R1-Distill-Llama-8B's config.json (Llama 3.1 8B), as published
HUB_R1_DISTILL_LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


@pytest.mark.parametrize("name,hub", [("deepseek_v3_671b", HUB_DEEPSEEK_V3),
                                      ("deepseek_v2_lite", HUB_DEEPSEEK_V2_LITE),
                                      ("r1_distill_llama_8b", HUB_R1_DISTILL_LLAMA_8B)])
def test_shipped_configs_match_the_hub(name, hub):
  shipped, from_hub = load_shipped(name), ModelConfig.from_hf(hub)
  fields = ARCH_FIELDS + ("kv_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
                          "rope_low_freq_factor", "rope_high_freq_factor")
  diff = {f: (getattr(shipped, f), getattr(from_hub, f)) for f in fields
          if getattr(shipped, f) != getattr(from_hub, f)}
  assert not diff, f"{name} differs from the hub config.json: {diff}"


def test_tiny_moe_exercises_every_mechanism():
  cfg = load_shipped("tiny_moe")
  assert cfg.is_moe and cfg.q_lora_rank and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
  assert 8 <= cfg.n_routed_experts <= 16 and cfg.num_nextn_predict_layers == 1
  assert 0 < cfg.num_dense_layers < cfg.num_hidden_layers and cfg.n_shared_experts > 0
  assert num_params(cfg) < 5_000_000


@pytest.mark.parametrize("name", ["tiny_moe", "deepseek_v3_671b", "deepseek_v2_lite"])
def test_shipped_configs_trace_forward(name):
  """The full forward (with MTP) traces at the real sizes on abstract params: no allocation."""
  cfg = load_shipped(name)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  logits, aux = jax.eval_shape(lambda p, t: model.forward_with_aux(p, t, cfg, mtp=True),
                               model.abstract(cfg), tokens)
  assert logits.shape == (1, 8, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["expert_counts"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
  if cfg.num_nextn_predict_layers:
    assert aux["mtp_logits"].shape == (cfg.num_nextn_predict_layers, 1, 8, cfg.vocab_size)


def _mla_params(c: ModelConfig) -> int:
  D, H = c.hidden_size, c.num_attention_heads
  q = (D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
       if c.q_lora_rank else D * H * c.qk_head_dim)
  kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + \
      c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
  return q + kv + H * c.v_head_dim * D + 2 * D  # + o_proj + the two layer norms


def _moe_layer_params(c: ModelConfig) -> int:
  D, E, I = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
  return _mla_params(c) + D * E + E + 3 * E * D * I + 3 * D * I * c.n_shared_experts


def test_deepseek_v3_has_671b_parameters():
  """671B is the published size without the MTP module; the hub's 685B adds the MTP module
  (one MoE layer, eh_proj, three norms) and its duplicated embedding and head (2*V*D). We share
  those, so ours with MTP is 685B - 2*V*D. Each count is asserted within 1%, and the MTP
  increment exactly against an independent count."""
  cfg = load_shipped("deepseek_v3_671b")
  main = num_params(cfg.replace(num_nextn_predict_layers=0))
  assert abs(main - 671e9) / 671e9 < 0.01, main
  D, V = cfg.hidden_size, cfg.vocab_size
  mtp = num_params(cfg) - main
  assert mtp == _moe_layer_params(cfg) + 2 * D * D + 3 * D
  assert abs(num_params(cfg) + 2 * V * D - 685e9) / 685e9 < 0.01
  # and the main count itself against the independent one
  dense_layer = _mla_params(cfg) + 3 * D * cfg.intermediate_size
  assert main == (2 * V * D + D + cfg.num_dense_layers * dense_layer
                  + cfg.num_moe_layers * _moe_layer_params(cfg))


def test_deepseek_v2_lite_has_16b_parameters():
  """DeepSeek-V2-Lite: 15.7B parameters (the "16B" of its name)."""
  n = num_params(load_shipped("deepseek_v2_lite"))
  assert abs(n - 15.7e9) / 15.7e9 < 0.01, n


# -------------------------------------------------------------------- hashing
def test_config_is_hashable_and_a_jit_static_arg():
  a = ModelConfig.from_config(TINY_MOE)
  b = ModelConfig.from_config(dict(TINY_MOE))
  assert a is not b and a == b and hash(a) == hash(b)
  assert a.replace(n_group=4, topk_group=2) != a
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.hidden_size = 64
  traces = []

  def f(x, cfg):
    traces.append(cfg)
    return x * cfg.hidden_size

  f = jax.jit(f, static_argnums=1)
  assert float(f(jnp.ones(()), a)) == 32.0
  assert float(f(jnp.ones(()), b)) == 32.0
  assert len(traces) == 1, "an equal config must hit the jit cache"
  assert float(f(jnp.ones(()), a.replace(hidden_size=64))) == 64.0
  assert len(traces) == 2
  assert len({a, b}) == 1


def test_dry_run_names_the_kernels_of_every_layer_part():
  from r1jax import dry_run
  from r1jax.run_config import tiny_moe_fields
  plain = "\n".join(dry_run.kernel_table(ModelConfig.from_config(tiny_moe_fields())))
  assert "routed experts, moe_impl=blocked" in plain and "FP8" not in plain
  assert "Pallas" not in plain and plain.count("XLA dot (float32)") == 3 * 3
  fast = ModelConfig.from_config(tiny_moe_fields(fp8=True, moe_impl="pallas",
                                                 router_impl="pallas"))
  lines = dry_run.kernel_table(fast)
  tpu = [line for line in lines if line.strip().startswith("tpu")]
  gpu = [line for line in lines if line.strip().startswith("gpu")]
  assert len(tpu) == 6 and sum("Pallas kernel (Mosaic TPU" in line for line in tpu) == 5
  assert sum("fallback" in line for line in gpu) == 4  # projections, MLP, experts, shared
  assert "MoE router (3 layers)" in "\n".join(lines) and "dense MLP (1 layer)" in "\n".join(lines)
  # ragged_dot: XLA:TPU's own; the work-item fallback elsewhere. cuDNN attention: GPU only
  rd = dry_run.kernel_table(ModelConfig.from_config(tiny_moe_fields(
      moe_impl="ragged_dot", dtype="bfloat16", attn_impl="cudnn")))
  by = {b: [line for line in rd if line.strip().startswith(b)] for b in ("cpu", "gpu", "tpu")}
  assert "jax.lax.ragged_dot (XLA:TPU)" in by["tpu"][4] and "work items" in by["gpu"][4]
  assert "cuDNN fused" in by["gpu"][1] and "needs a GPU" in by["cpu"][1]
  chunked = dry_run.kernel_table(ModelConfig.from_config(tiny_moe_fields(
      attn_chunk=512, attn_key_chunk=1024)))
  assert ("512-query chunks, 1024-key blocks (running softmax; the blocks after a chunk's last "
          "query, and those its mask allows nothing of, skipped)") in "\n".join(chunked)
  assert "context" not in "\n".join(chunked)
  split = dry_run.kernel_table(ModelConfig.from_config(tiny_moe_fields()), context=2)
  assert ("positions split over context 2 in zigzag order, every key gathered (the MLA latent"
          in "\n".join(split))
  assert "skipping its own blocks" not in "\n".join(split)  # no key blocks, no skip
  split = dry_run.kernel_table(ModelConfig.from_config(tiny_moe_fields(
      attn_key_chunk=64, context_order="contiguous")), context=2)
  assert "context 2 in order" in "\n".join(split) and "skipping its own" in "\n".join(split)


@pytest.mark.parametrize("name, caveat", [
    ("r1_tiny", None), ("r1_zero_tiny", None),  # SFT / pretrain first: the step it compiles
    ("r1_zero_smollm2", "'grpo', is GRPO with share_prompt; the figures above are the SFT step's"),
])
def test_dry_run_says_when_it_does_not_compile_the_first_stage(name, caveat):
  from r1jax import dry_run
  from r1jax.run_config import from_file
  lines = dry_run._stage_caveat(from_file(os.path.join(CONFIGS_DIR, f"{name}.py")))
  if caveat is None:
    assert lines == [], lines
  if caveat:  # and its LoRA
    assert len(lines) == 2 and "lora.rank=16" in lines[0] and caveat in lines[1], lines


def test_dry_run_hints_at_fast_buffers_for_dropless_exchanges_on_an_expert_axis():
  from r1jax import dry_run
  from r1jax.run_config import from_file
  v3 = ModelConfig.from_config(from_file(os.path.join(CONFIGS_DIR, "deepseek_v3_671b.py")).model)
  assert v3.capacity_factor is None and v3.dropless_fast_factor == 2.0
  assert dry_run._dispatch_hint(v3, 64) == []  # the config as shipped: fast buffers
  assert dry_run._dispatch_hint(v3.replace(capacity_factor=1.25), 64) == []  # drops, counted
  assert dry_run._dispatch_hint(v3.replace(dropless_fast_factor=None), 1) == []  # no exchange
  exact = dry_run._dispatch_hint(v3.replace(dropless_fast_factor=None), 64)
  gather = dry_run._dispatch_hint(v3.replace(expert_dispatch="allgather"), 64)
  assert len(exact) == 1 and "all_to_all without dropless_fast_factor" in exact[0], exact
  assert len(gather) == 1 and "allgather gathers every token" in gather[0], gather
  assert "--config.model.dropless_fast_factor=2.0" in exact[0]


def test_dry_run_compiles_a_first_grpo_stage_with_its_reference_and_routing():
  """grpo_tiny without its SFT stage, with a KL term and routing replay: the dry run compiles
  the GRPO update on its rows, adds the reference policy's bytes, and the total adds up. It
  compiles the rollout too, whose total adds its temporaries to the resident state."""
  import re
  from r1jax import dry_run
  from r1jax.run_config import from_file
  c = from_file(os.path.join(CONFIGS_DIR, "grpo_tiny.py"))
  c.stage_order = ("grpo",)
  c.stages.grpo.beta = 0.04
  c.stages.grpo.routing_replay = True
  out = dry_run.report(c, 2)
  s = c.stages.grpo
  rows, T = s.prompts_per_step * s.group_size, c.data.seq_len + s.max_new_tokens - 1
  assert f"batch {rows} x {T} tokens" in out and "compiled the GRPO update of stage 'grpo'" in out
  gib = {k: float(re.search(rf"  {k} +([0-9.]+) GiB", out).group(1))
         for k in ("parameters", "optimizer state", "temporaries", "reference policy", "total")}
  assert gib["reference policy"] == gib["parameters"], out
  assert abs(sum(v for k, v in gib.items() if k != "total") - gib["total"]) <= 0.02, out
  rows = s.prompts_per_step * s.group_size
  assert (f"compiled the rollout (sampler.generate: {rows} rows, {s.prompts_per_step} "
          f"prefilled, {c.data.seq_len} + {s.max_new_tokens} cache slots)") in out, out
  roll = {k: float(re.search(rf"  rollout {k} +([0-9.]+) GiB", out).group(1))
          for k in ("temporaries", "total")}
  resident = gib["parameters"] + gib["optimizer state"] + gib["reference policy"]
  assert roll["temporaries"] > 0 and abs(resident + roll["temporaries"] - roll["total"]) <= 0.02
  assert "note:" not in out, out


def test_dry_run_compiles_a_speculative_rollout():
  """With draft="mtp" the dry run compiles the speculative core: twice the decode slots and
  the MTP module's cache, so more rollout temporaries than plain decoding's."""
  import re
  from r1jax import dry_run
  from r1jax.run_config import from_file
  c = from_file(os.path.join(CONFIGS_DIR, "grpo_tiny.py"))
  c.stage_order = ("grpo",)
  temps = {}
  for draft in ("", "mtp"):
    c.stages.grpo.draft = draft
    out = dry_run.report(c, 2)
    temps[draft] = float(re.search(r"  rollout temporaries +([0-9.]+) GiB", out).group(1))
  s = c.stages.grpo
  assert (f"{c.data.seq_len} + 2 x {s.max_new_tokens} cache slots, MTP drafts)") in out, out
  assert temps["mtp"] >= temps[""], temps
