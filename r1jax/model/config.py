"""Model configuration: one frozen, hashable dataclass with HF field names.

`ModelConfig` is static under `jax.jit` (hashable), built at the boundary from a HF
`config.json` (`ModelConfig.from_hf`) or from the `model` section of an ml_collections config
(`ModelConfig.from_config`). Every rule is checked once, in `validate`, with an error that names
the field and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any, Mapping

from r1jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelType:
  """What a model_type is made of, and how its HF config.json names things.

  attention: "mla" | "gqa" (an entry of `r1jax.model.families.ATTENTION`).
  moe_layers: which layers have the MoE FFN: None (a dense model), "first_k_dense" (DeepSeek:
    layers >= first_k_dense_replace) or "sparse_step" (Qwen3-MoE: every decoder_sparse_step-th
    layer not in mlp_only_layers).
  qk_norm: RMSNorm over each head's q and k before RoPE (Qwen3).
  mtp: the model may have multi-token-prediction modules (DeepSeek-V3).
  architecture: the HF causal-LM class `to_hf` names (a sequence classifier's is
    `classifier_architecture` of it).
  preset: field defaults where transformers' config class differs from ModelConfig's defaults
    (DeepSeek-V3's).
  hf_names: {our field: its config.json names, first found wins} where they differ.
  """
  attention: str
  moe_layers: str | None
  architecture: str
  qk_norm: bool = False
  mtp: bool = False
  preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  hf_names: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


# a plain GQA decoder: no q-LoRA, no experts, rotate-half RoPE without scaling
_GQA_DENSE = dict(q_lora_rank=None, n_routed_experts=None, first_k_dense_replace=0,
                  num_nextn_predict_layers=0, rope_type="default", rope_interleave=False,
                  attention_bias=False, rope_theta=1e6)

# The one table of model types. A new one is an entry here (and, with a new attention, a module
# plus an entry in r1jax.model.families.ATTENTION).
MODEL_TYPE_TABLE: dict[str, ModelType] = {
    "deepseek_v3": ModelType("mla", "first_k_dense", "DeepseekV3ForCausalLM", mtp=True),
    # transformers' DeepseekV2 defaults (its config.json may omit them): softmax greedy routing,
    # no correction bias, no MTP module
    "deepseek_v2": ModelType("mla", "first_k_dense", "DeepseekV2ForCausalLM", mtp=True, preset=dict(
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, num_nextn_predict_layers=0)),
    "qwen2": ModelType("gqa", None, "Qwen2ForCausalLM",
                       preset=dict(_GQA_DENSE, attention_bias=True)),
    "qwen3": ModelType("gqa", None, "Qwen3ForCausalLM", qk_norm=True, preset=_GQA_DENSE),
    # transformers' Qwen3MoeConfig: softmax top-k without groups, shared experts or scaling
    "qwen3_moe": ModelType("gqa", "sparse_step", "Qwen3MoeForCausalLM", qk_norm=True, preset=dict(
        _GQA_DENSE, n_routed_experts=256, n_shared_experts=0, n_group=1, topk_group=1,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0),
        # transformers 5 writes num_local_experts, 4.x num_experts
        hf_names={"n_routed_experts": ("num_experts", "num_local_experts")}),
    "llama": ModelType("gqa", None, "LlamaForCausalLM", preset=dict(_GQA_DENSE, rope_theta=1e4)),
}
MODEL_TYPES = tuple(MODEL_TYPE_TABLE)
MOE_IMPLS = ("ragged_dot", "capacity", "blocked", "pallas", "dense")
ROUTER_IMPLS = ("jnp", "pallas")
ROUTER_GROUP_FILLS = ("neg_inf", "zero")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLS = ("xla", "cudnn")
# RoPE frequency schemes (transformers' rope_type): YaRN (DeepSeek-V3), linear position
# interpolation, and Llama 3.1's per-band scaling (the R1-Distill-Llama students)
ROPE_TYPES = ("default", "yarn", "linear", "llama3")
CONTEXT_ORDERS = ("zigzag", "contiguous")
CLASSIFIER_SUFFIX = "ForSequenceClassification"


def classifier_architecture(architecture: str) -> str:
  """The HF sequence-classifier class of a causal-LM class: LlamaForCausalLM ->
  LlamaForSequenceClassification."""
  return architecture.removesuffix("ForCausalLM") + CLASSIFIER_SUFFIX


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder of one of MODEL_TYPES. Field names follow HF.

  Each layer combines an attention kind (`attention`: "mla" for DeepSeek, "gqa" otherwise) with
  an FFN kind (`layer_is_moe(i)`: DeepSeek's first_k_dense_replace, Qwen3-MoE's
  decoder_sparse_step and mlp_only_layers); dense Qwen2/Qwen3/Llama have no MoE layer."""

  model_type: str = "deepseek_v3"
  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432  # dense MLP width
  num_hidden_layers: int = 61
  num_attention_heads: int = 128
  num_key_value_heads: int | None = None  # dense GQA models; MLA ignores it
  head_dim: int | None = None  # dense models; None = hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v bias (Qwen2: True)
  max_position_embeddings: int = 163840
  bos_token_id: int | None = 0
  eos_token_id: int | None = 1
  pad_token_id: int | None = None
  # head: 0 = a causal LM (its LM head); >= 1 = a sequence classifier (HF's
  # *ForSequenceClassification, a reward model with 1): a bias-free `score` [D, num_labels]
  # replaces the LM head, read at each row's last real token (`model.reward_scores`)
  num_labels: int = 0
  # mla
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # moe
  n_routed_experts: int | None = 256  # None = dense model (HF Qwen3-MoE: num_experts)
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  moe_intermediate_size: int = 2048
  first_k_dense_replace: int = 3
  moe_layer_freq: int = 1
  decoder_sparse_step: int = 1  # Qwen3-MoE: layer i has experts iff (i + 1) % step == 0 ...
  mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
  n_group: int = 8
  topk_group: int = 4
  scoring_func: str = "sigmoid"
  topk_method: str = "noaux_tc"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  # rope / yarn
  rope_theta: float = 10000.0
  rope_interleave: bool = True
  rope_type: str = "yarn"  # one of ROPE_TYPES
  rope_factor: float = 40.0  # yarn, linear and llama3
  original_max_position_embeddings: int = 4096  # yarn and llama3
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = 1.0  # None/0 as in HF: attention factor from `factor` alone
  mscale_all_dim: float | None = 1.0
  # mtp
  num_nextn_predict_layers: int = 1
  # execution (not HF fields)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  moe_impl: str = "ragged_dot"
  capacity_factor: float | None = None  # None = dropless
  # dropless buffers of this factor x the mean load, exact either way: the capacity path's
  # per-expert buffers when every expert's load fits, else N slots; the all_to_all and
  # ragged_all_to_all exchanges' buffers, over the fewest token slices that fit them
  # (moe/dispatch.py `_dropless`; metric moe_exchange_rounds)
  dropless_fast_factor: float | None = None
  # the most tokens per device one dropless exchange carries: longer rows exchange in at least
  # ceil(tokens / this) slices, one after another, and the fast buffers are sized for one slice
  # (moe/dispatch.py `_dropless`); None: all of them at once
  dropless_max_tokens: int | None = None
  router_impl: str = "jnp"
  # selection score given to the experts of dropped groups before the top-k (model/moe/routing.py
  # `route`): "neg_inf" as DeepSeek's own code, so they are never chosen; "zero" as the
  # masked_fill(.., 0.0) of transformers' DeepseekV2 (and its DeepseekV3 before the -inf fix),
  # which picks them over kept experts whose bias-corrected score is negative
  router_group_fill: str = "neg_inf"
  expert_dispatch: str = "allgather"  # on a mesh: allgather | all_to_all | ragged_all_to_all
  fp8: bool = False
  remat: str = "none"
  # the training and scoring forward runs each layer stack under lax.scan (True: compile time
  # independent of depth) or as a Python loop over the layers (False: no stacked residuals or
  # per-layer slicing and updates in the step; the tiny CPU configs' SFT step is 5-10 % faster
  # that way, benchmarks/train_step.py). Params are stacked either way. Decoding always scans
  # (the loop made the tiny sampler ~8 % slower).
  scan_layers: bool = True
  attn_chunk: int | None = None  # queries per attention chunk (exact; bounds [H, T, S] scores)
  attn_key_chunk: int | None = None  # keys per block within a chunk (online softmax, layers.attend)
  # the training and prefill attention: "xla" (einsums and an fp32 softmax, every backend) or
  # "cudnn" (jax.nn.dot_product_attention's fused cuDNN kernel: GPUs, bf16/fp16 only; attn_chunk
  # is then unused, since the kernel never forms the scores)
  attn_impl: str = "xla"
  # context parallelism (a `context` mesh axis): the order in which the layers see each row's
  # positions. "zigzag": cut into 2 x context chunks, device s holding chunks s and
  # 2 x context - 1 - s, so each device's causal attention skips about half the key blocks
  # (layers.zigzag_slots; where 2 x context does not divide the row, position order);
  # "contiguous": in order, where the device with the last positions skips almost none
  context_order: str = "zigzag"
  # positions per LM-head chunk in the SFT and GRPO losses, every row at once (exact; bounds the
  # [B, T, V] logits, ~15 GiB per 8k tokens at a 152k vocabulary; decoder.chunked_target_logprobs)
  logits_chunk: int | None = None

  # ---------------------------------------------------------------- derived
  @property
  def family(self) -> ModelType:
    return MODEL_TYPE_TABLE[self.model_type]

  @property
  def hf_architecture(self) -> str:
    """The HF class of this model: the family's causal LM, or its sequence classifier."""
    arch = self.family.architecture
    return classifier_architecture(arch) if self.num_labels else arch

  @property
  def attention(self) -> str:
    """"mla" (DeepSeek's multi-head latent attention) or "gqa" (grouped-query attention)."""
    return self.family.attention

  @property
  def is_moe(self) -> bool:
    """Some layers have a routed-expert FFN (the params then hold dense_layers / moe_layers
    stacks instead of one `layers` stack)."""
    return self.family.moe_layers is not None

  @property
  def qk_norm(self) -> bool:
    """Qwen3: RMSNorm over each head's q and k (weights [head_dim]) before RoPE."""
    return self.family.qk_norm

  def layer_is_moe(self, i: int) -> bool:
    """Whether decoder layer i has the MoE FFN."""
    layout = self.family.moe_layers
    if layout == "sparse_step":
      return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
    return layout == "first_k_dense" and i >= self.first_k_dense_replace

  @property
  def layer_runs(self) -> tuple[tuple[str, int, int], ...]:
    """The layers in order as runs of one FFN kind: (stack, first index in the stack, count).
    A MoE model keeps its dense and MoE layers in two stacks ("dense_layers", "moe_layers"),
    each scanned run by run; a dense model has the one stack "layers"."""
    if not self.is_moe:
      return (("layers", 0, self.num_hidden_layers),)
    runs, seen = [], {"dense_layers": 0, "moe_layers": 0}
    for i in range(self.num_hidden_layers):
      stack = "moe_layers" if self.layer_is_moe(i) else "dense_layers"
      if runs and runs[-1][0] == stack:
        runs[-1][2] += 1
      else:
        runs.append([stack, seen[stack], 1])
      seen[stack] += 1
    return tuple(tuple(r) for r in runs)

  @property
  def num_dense_layers(self) -> int:
    return sum(not self.layer_is_moe(i) for i in range(self.num_hidden_layers))

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.num_dense_layers

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def dense_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def jnp_dtype(self):
    import jax.numpy as jnp
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    import jax.numpy as jnp
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw).validate()

  # ------------------------------------------------------------- validation
  def validate(self) -> "ModelConfig":
    def need(ok, msg):
      if not ok:
        raise ConfigError(f"model.{msg}")

    need(self.model_type in MODEL_TYPES,
         f"model_type={self.model_type!r} is not one of {MODEL_TYPES}")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size"):
      need(int(getattr(self, f)) > 0, f"{f}={getattr(self, f)} must be positive")
    need(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be positive")
    need(self.num_labels >= 0, f"num_labels={self.num_labels} must be >= 0 (0: a causal LM)")
    need(not self.num_labels or not self.num_nextn_predict_layers,
         f"num_labels={self.num_labels} (a sequence classifier) needs num_nextn_predict_layers=0: "
         f"MTP modules predict tokens through the LM head, which a classifier has not "
         f"(num_nextn_predict_layers={self.num_nextn_predict_layers})")
    need(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {DTYPES}")
    need(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r} is not one of {DTYPES}")
    need(self.attn_chunk is None or self.attn_chunk > 0,
         f"attn_chunk={self.attn_chunk} must be positive or None")
    need(self.attn_key_chunk is None or self.attn_key_chunk > 0,
         f"attn_key_chunk={self.attn_key_chunk} must be positive or None")
    need(self.context_order in CONTEXT_ORDERS,
         f"context_order={self.context_order!r} is not one of {CONTEXT_ORDERS}")
    need(self.attn_impl in ATTN_IMPLS,
         f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
    need(self.attn_impl != "cudnn" or self.dtype in ("bfloat16", "float16"),
         f"attn_impl='cudnn' needs dtype bfloat16 or float16, not {self.dtype!r}")
    need(self.logits_chunk is None or self.logits_chunk > 0,
         f"logits_chunk={self.logits_chunk} must be positive or None")
    need(self.remat in REMAT_POLICIES, f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
    need(self.rope_type in ROPE_TYPES,
         f"rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")
    need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
    if self.rope_type != "default":
      need(self.rope_factor >= 1, f"rope_factor={self.rope_factor} must be >= 1")
    if self.rope_type in ("yarn", "llama3"):
      need(self.original_max_position_embeddings > 0,
           "original_max_position_embeddings must be positive")
    if self.rope_type == "llama3":
      need(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
           f"rope_low_freq_factor={self.rope_low_freq_factor} and rope_high_freq_factor="
           f"{self.rope_high_freq_factor} need 0 < low < high")
    if self.attention == "mla":
      for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        need(getattr(self, f) > 0, f"{f}={getattr(self, f)} must be positive")
      need(self.qk_rope_head_dim % 2 == 0,
           f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
      need(self.q_lora_rank is None or self.q_lora_rank > 0,
           f"q_lora_rank={self.q_lora_rank} must be positive or None")
      need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
    if not self.family.mtp:
      need(self.num_nextn_predict_layers == 0,
           f"num_nextn_predict_layers={self.num_nextn_predict_layers}: only DeepSeek models "
           "have MTP modules")
    if self.family.moe_layers == "sparse_step":
      need(self.decoder_sparse_step >= 1,
           f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
      need(all(0 <= i < self.num_hidden_layers for i in self.mlp_only_layers),
           f"mlp_only_layers={self.mlp_only_layers} must be layer indices < "
           f"num_hidden_layers={self.num_hidden_layers}")
    if self.is_moe:
      need(0 <= self.first_k_dense_replace, "first_k_dense_replace must be >= 0")
      need(self.moe_layer_freq == 1, f"moe_layer_freq={self.moe_layer_freq}: only 1 is supported")
      E = self.n_routed_experts
      need(E is not None and E > 0, f"n_routed_experts={E} must be positive for a MoE model")
      need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
      need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
      need(0 < self.num_experts_per_tok <= E,
           f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={E}]")
      need(self.n_group > 0 and E % self.n_group == 0,
           f"n_group={self.n_group} must divide n_routed_experts={E}")
      need(0 < self.topk_group <= self.n_group,
           f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
      need(self.num_experts_per_tok <= self.topk_group * (E // self.n_group),
           f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group="
           f"{self.topk_group} groups of {E // self.n_group}")
      need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
           f"topk_method={self.topk_method!r} must be noaux_tc, greedy or group_limited_greedy")
      need(self.scoring_func in ("sigmoid", "softmax"),
           f"scoring_func={self.scoring_func!r} must be 'sigmoid' or 'softmax'")
      need(self.moe_impl in MOE_IMPLS, f"moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}")
      need(self.expert_dispatch in ("allgather", "all_to_all", "ragged_all_to_all"),
           f"expert_dispatch={self.expert_dispatch!r} must be 'allgather', 'all_to_all' or "
           "'ragged_all_to_all'")
      need(self.router_impl in ROUTER_IMPLS,
           f"router_impl={self.router_impl!r} is not one of {ROUTER_IMPLS}")
      need(self.router_group_fill in ROUTER_GROUP_FILLS,
           f"router_group_fill={self.router_group_fill!r} is not one of {ROUTER_GROUP_FILLS}")
      need(self.capacity_factor is None or self.capacity_factor > 0,
           f"capacity_factor={self.capacity_factor} must be positive or None")
      need(self.dropless_fast_factor is None or self.dropless_fast_factor > 0,
           f"dropless_fast_factor={self.dropless_fast_factor} must be positive or None")
      need(self.dropless_max_tokens is None or self.dropless_max_tokens > 0,
           f"dropless_max_tokens={self.dropless_max_tokens} must be positive or None")
    if self.attention == "gqa":
      need(self.num_attention_heads % self.kv_heads == 0,
           f"num_key_value_heads={self.kv_heads} must divide "
           f"num_attention_heads={self.num_attention_heads}")
      need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
           f"num_attention_heads={self.num_attention_heads} must divide "
           f"hidden_size={self.hidden_size} (or set head_dim)")
      need(self.dense_head_dim % 2 == 0, f"head_dim={self.dense_head_dim} must be even")
    return self

  # -------------------------------------------------------------- builders
  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "ModelConfig":
    """From an ml_collections `model` section (or any mapping of field -> value)."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"model.{unknown[0]} is not a model field")
    if isinstance(d.get("mlp_only_layers"), list):
      d["mlp_only_layers"] = tuple(d["mlp_only_layers"])
    base = cls.preset(d.get("model_type", "deepseek_v3"))
    return dataclasses.replace(base, **d).validate()

  @classmethod
  def preset(cls, model_type: str) -> "ModelConfig":
    """The model type's defaults (`MODEL_TYPE_TABLE[model_type].preset` over DeepSeek-V3's)."""
    family = MODEL_TYPE_TABLE.get(model_type)
    return cls(model_type=model_type, **(family.preset if family else {}))

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From a HF config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`).
    An `architectures` entry *ForSequenceClassification makes a sequence classifier, num_labels
    from `id2label` (or `num_labels`; transformers' default 2 without either)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ConfigError(f"config.json: model_type={model_type!r} is not supported "
                        f"(expected one of {MODEL_TYPES})")
    names = {f.name for f in dataclasses.fields(cls)}
    # HF's dtype/torch_dtype is the storage dtype, not our compute dtype; num_labels follows the
    # architecture (`_hf_num_labels`), not a stray key of a causal LM's config
    kw = {k: v for k, v in hf.items()
          if k in names and k not in ("dtype", "param_dtype", "num_labels")}
    kw["num_labels"] = _hf_num_labels(hf)
    if kw["num_labels"]:  # transformers' classifiers hold no MTP module
      kw["num_nextn_predict_layers"] = 0
    family = MODEL_TYPE_TABLE[model_type]
    for ours, theirs in family.hf_names.items():
      found = [hf[name] for name in theirs if hf.get(name) is not None]
      if found:
        kw[ours] = found[0]
    if family.attention == "gqa":
      kw["rope_interleave"] = False  # HF's GQA models rotate halves
    if "mlp_only_layers" in kw or family.moe_layers == "sparse_step":
      kw["mlp_only_layers"] = tuple(hf.get("mlp_only_layers") or ())
    if isinstance(kw.get("eos_token_id"), list):
      kw["eos_token_id"] = kw["eos_token_id"][0]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is not None:
      kw["rope_theta"] = float(theta)
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ROPE_TYPES:
      raise ConfigError(f"config.json: rope type {rtype!r} is not supported {ROPE_TYPES}")
    kw["rope_type"] = rtype
    for k in ("n_group", "topk_group"):  # transformers' DeepseekV2 writes null for ungrouped
      if k in kw and kw[k] is None:
        kw[k] = 1
    if rtype == "yarn":
      kw["rope_factor"] = float(rope.get("factor", 1.0))
      for k in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
        if rope.get(k) is not None:
          kw[k] = rope[k]
      kw["mscale"] = rope.get("mscale")
      kw["mscale_all_dim"] = rope.get("mscale_all_dim")
    if rtype in ("linear", "llama3"):
      kw["rope_factor"] = float(rope.get("factor", 1.0))
    if rtype == "llama3":
      keys = ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
      missing = [k for k in ("factor",) + keys if rope.get(k) is None]
      if missing:
        raise ConfigError(f"config.json: llama3 rope scaling lacks {', '.join(missing)}")
      kw["original_max_position_embeddings"] = int(rope[keys[0]])
      kw["rope_low_freq_factor"] = float(rope[keys[1]])
      kw["rope_high_freq_factor"] = float(rope[keys[2]])
    for k, v in list(kw.items()):
      if isinstance(v, (list, dict)):
        raise ConfigError(f"config.json: {k}={v!r} has an unexpected type")
    kw.update(overrides)
    base = cls.preset(model_type)
    try:
      return dataclasses.replace(base, **kw).validate()
    except TypeError as e:  # pragma: no cover - dataclass field errors
      raise ConfigError(f"config.json: {e}") from None

  @classmethod
  def from_hf_dir(cls, path: str, **overrides) -> "ModelConfig":
    fn = os.path.join(path, "config.json")
    if not os.path.isfile(fn):
      raise ConfigError(f"{fn}: not found")
    try:
      with open(fn) as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{fn}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(hf, dict):
      raise ConfigError(f"{fn}: expected a JSON object")
    return cls.from_hf(hf, **overrides)

  def to_hf(self) -> dict:
    """A config.json dict that transformers' from_pretrained accepts."""
    common = dict(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads, rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings,
        max_position_embeddings=self.max_position_embeddings, hidden_act="silu",
        bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id, rope_theta=self.rope_theta,
        torch_dtype=self.param_dtype, attention_dropout=0.0)
    rope = None
    if self.rope_type == "yarn":
      rope = dict(type="yarn", rope_type="yarn", factor=self.rope_factor,
                  original_max_position_embeddings=self.original_max_position_embeddings,
                  beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
                  mscale_all_dim=self.mscale_all_dim)
    elif self.rope_type == "linear":
      rope = dict(type="linear", rope_type="linear", factor=self.rope_factor)
    elif self.rope_type == "llama3":
      rope = dict(type="llama3", rope_type="llama3", factor=self.rope_factor,
                  original_max_position_embeddings=self.original_max_position_embeddings,
                  low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor)
    common["rope_scaling"] = rope
    if self.num_labels:  # transformers derives num_labels from id2label
      labels = [f"LABEL_{i}" for i in range(self.num_labels)]
      common.update(id2label={str(i): name for i, name in enumerate(labels)},
                    label2id={name: i for i, name in enumerate(labels)})
    if self.attention == "gqa":
      gqa = dict(common, model_type=self.model_type, architectures=[self.hf_architecture],
                 num_key_value_heads=self.kv_heads, head_dim=self.dense_head_dim,
                 attention_bias=self.attention_bias, use_sliding_window=False)
      if self.family.moe_layers == "sparse_step":
        gqa.update(num_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                   moe_intermediate_size=self.moe_intermediate_size,
                   decoder_sparse_step=self.decoder_sparse_step,
                   mlp_only_layers=list(self.mlp_only_layers), norm_topk_prob=self.norm_topk_prob)
      return gqa
    return dict(
        common, model_type=self.model_type,
        architectures=[self.hf_architecture],
        num_key_value_heads=self.num_attention_heads, attention_bias=self.attention_bias,
        q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
        qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
        v_head_dim=self.v_head_dim, head_dim=self.qk_rope_head_dim,
        n_routed_experts=self.n_routed_experts, n_shared_experts=self.n_shared_experts,
        num_experts_per_tok=self.num_experts_per_tok,
        moe_intermediate_size=self.moe_intermediate_size,
        first_k_dense_replace=self.first_k_dense_replace, moe_layer_freq=self.moe_layer_freq,
        n_group=self.n_group, topk_group=self.topk_group, scoring_func=self.scoring_func,
        topk_method=self.topk_method, norm_topk_prob=self.norm_topk_prob,
        routed_scaling_factor=self.routed_scaling_factor, rope_interleave=self.rope_interleave,
        num_nextn_predict_layers=self.num_nextn_predict_layers)


def _hf_num_labels(hf: Mapping[str, Any]) -> int:
  """num_labels of a HF config.json: 0 unless an architecture is a sequence classifier."""
  archs = hf.get("architectures") or ()
  if not any(isinstance(a, str) and a.endswith(CLASSIFIER_SUFFIX) for a in archs):
    return 0
  id2label = hf.get("id2label")
  if id2label is not None:
    if not isinstance(id2label, dict) or not id2label:
      raise ConfigError(f"config.json: id2label={id2label!r} must be a non-empty object")
    return len(id2label)
  n = hf.get("num_labels", 2)
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ConfigError(f"config.json: num_labels={n!r} must be a positive integer")
  return n


def yarn_mscale(factor: float, mscale: float) -> float:
  """DeepSeek's YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def model_section(**fields):
  """An ml_collections `model` section: every ModelConfig field, so overrides type-check."""
  import ml_collections
  from ml_collections import config_dict
  base = ModelConfig.preset(fields.get("model_type", "deepseek_v3"))
  d = dataclasses.asdict(dataclasses.replace(base, **fields))
  hints = typing.get_type_hints(ModelConfig)
  for k, v in d.items():
    if v is None:  # a typed placeholder, so `--config.model.K=VALUE` can set it
      kind = next(t for t in typing.get_args(hints[k]) if t is not type(None))
      d[k] = config_dict.placeholder(kind)
  return ml_collections.ConfigDict(d)
