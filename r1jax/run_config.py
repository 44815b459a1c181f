"""The run config (ml_collections): defaults for every section and one early validation pass.

Sections: model (ModelConfig fields), mesh, data, optim, train, stages (keyed by stage name, run
in `stage_order`), eval, checkpoint, log; plus `seed` and `max_steps` (0 = off, else caps the
steps of every stage).
"""

from __future__ import annotations

import math
import os

import ml_collections

from r1jax.checkpoint import sources
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig, model_section
from r1jax.parallel import mesh as mesh_lib

STAGE_KINDS = ("pretrain", "sft", "grpo", "rejection_sampling", "distill", "reward_model", "eval")
TRAINING_KINDS = ("pretrain", "sft", "grpo", "distill", "reward_model")


def from_file(path: str, arg=None, *, relative_to: str | None = None):
  """The `get_config(arg)` of another config file, for configs built on one another
  (configs/grpo_qwen3_tiny.py is configs/grpo_tiny.py with another model). A relative `path` is
  taken from the directory of the file `relative_to` (a config passes its own __file__)."""
  import importlib.util
  import os
  if relative_to is not None and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config(**model_fields) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.max_steps = 0
  c.model = model_section(**model_fields)
  c.init_from = ""  # a HF checkpoint dir to start the first stage from ("" = random init)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, context=1, tensor=1))
  c.data = ml_collections.ConfigDict(dict(
      tokenizer="char",  # "char" (built in) or a dir/file with a HF tokenizer.json
      task="arithmetic",  # built-in task, or "file" to read train_file / eval_file
      train_file="", eval_file="", prompt_field="question", completion_field="completion",
      answer_field="answer", template="r1", batch_size=32, seq_len=96, pack=True,
      # arithmetic task: cold-start traces cover `covered_digits` (`covered_operands` terms);
      # RL/eval add the uncovered ones (longer operands, or chains a+b+c of more terms)
      covered_digits=(1, 2), uncovered_digits=(3, 3), covered_operands=2, uncovered_operands=2,
      rl_uncovered_frac=0.5,  # share of RL prompts from the uncovered part
      uncovered_traces=0,  # traced uncovered problems in the SFT split (a kind seen rarely)
      trace_both_orders=False,  # also trace every SFT sum with its operands reversed (b+a)
      # covered problems have at most this many operands longer than covered_digits[0]
      # (1: 7+45 but not 23+45; None: no limit)
      covered_long_operands=ml_collections.FieldReference(None, field_type=int),
      num_sft_examples=400,
      num_rl_prompts=2000, num_eval_problems=100,
      # arithmetic: a second, larger held-out set of uncovered problems, drawn after every
      # other split (so it changes none of them) and scored greedily after each training stage
      num_heldout_uncovered=0))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
      clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, mu_dtype=""))
  c.train = ml_collections.ConfigDict(dict(
      accum_steps=1, mtp_weight=0.0, balance_alpha=0.0, bias_gamma=1e-3, nonfinite="skip"))
  # LoRA for the policy's training stages (rank 0 = full fine-tuning): adapters on `targets`
  # (empty = every attention and MLP projection), alpha / rank scaling (r1jax.model.lora)
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=(), experts=False))
  c.stages = ml_collections.ConfigDict()
  c.stage_order = ()
  c.eval = ml_collections.ConfigDict(dict(
      num_problems=100, k=4, temperature=0.6, top_p=0.95, max_new_tokens=64, greedy=True,
      draft=""))  # "mtp": models with an MTP module decode their evaluation speculatively
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=2, async_save=True))
  c.log = ml_collections.ConfigDict(dict(every_steps=10, plots=True, tensorboard=True))
  return c


def stage(kind: str, steps: int, **fields) -> ml_collections.ConfigDict:
  """A stage entry: `kind`, `steps`, and stage-specific fields (e.g. lr overrides)."""
  return ml_collections.ConfigDict(dict(kind=kind, steps=steps, **fields))


def validate(c) -> ModelConfig:
  """Check the whole run config once; returns the ModelConfig. Raises ConfigError."""
  for key in ("seed", "max_steps", "model", "mesh", "data", "optim", "train", "stages",
              "stage_order", "checkpoint", "log"):
    if key not in c:
      raise ConfigError(f"config has no `{key}` section")
  if int(c.max_steps) < 0:
    raise ConfigError(f"max_steps={c.max_steps} must be >= 0")
  if int(c.seed) < 0:
    raise ConfigError(f"seed={c.seed} must be >= 0")
  cfg = ModelConfig.from_config(c.model)
  mesh_lib.axis_sizes(c.mesh.to_dict())  # the device count is checked when the mesh is built
  order = list(c.stage_order)
  if not order:
    raise ConfigError("stage_order is empty: name at least one stage of `stages`")
  for name in order:
    if name not in c.stages:
      raise ConfigError(f"stage_order names {name!r}, which is not in stages "
                        f"({', '.join(c.stages.keys())})")
  if len(set(order)) != len(order):
    raise ConfigError("stage_order names a stage twice")
  stages = stage_configs(c)
  for name, s in stages.items():
    if name not in order:
      continue  # defined but not run: its references need not resolve
    policy_kinds = ("pretrain", "sft", "grpo")
    for field, ref, kinds in (("match_compute_of", s_get(s, "match_compute_of"), TRAINING_KINDS),
                              ("start_from", s.start_from, ("distill",) if s.kind == "distill"
                               else policy_kinds + ("reward_model",) if s.kind == "reward_model"
                               else policy_kinds),
                              ("teacher", s_get(s, "teacher"), policy_kinds),
                              ("ref_from", s_get(s, "ref_from"), policy_kinds)):
      if ref and (ref not in order or order.index(ref) >= order.index(name)
                  or stages[ref].kind not in kinds):
        raise ConfigError(f"stages.{name}.{field}={ref!r} must name a "
                          f"{'/'.join(kinds)} stage that runs before it")
    for ref in (s.reward_models if s.kind == "grpo" else ()):
      if ref in c.stages and (ref not in order or order.index(ref) >= order.index(name)
                              or stages[ref].kind != "reward_model"):
        raise ConfigError(f"stages.{name}.reward_model={ref!r} must name a reward_model stage "
                          "that runs before it (or a HF classifier checkpoint directory)")
      if ref not in c.stages and ref not in sources.SOURCES and "://" not in ref \
          and not os.path.isdir(ref):
        raise ConfigError(f"stages.{name}.reward_model={ref!r} is neither a stage nor a "
                          "checkpoint directory")
    if s.kind == "reward_model" and s.pairs_per_step % int(c.train.accum_steps):
      raise ConfigError(f"train.accum_steps={c.train.accum_steps} must divide stages.{name}."
                        f"pairs_per_step={s.pairs_per_step} (a micro-batch keeps whole pairs)")
    if s_get(s, "with_sft_split") and c.data.task == "file":
      raise ConfigError(f"stages.{name}.with_sft_split needs the built-in task's SFT split, "
                        "and data.task is 'file'")
    for field in ("draft", "draft_weight"):  # only DeepSeek models have MTP modules
      if s_get(s, field) and not cfg.num_nextn_predict_layers:
        raise ConfigError(f"stages.{name}.{field}={s_get(s, field)!r} needs a model with an MTP "
                          f"module (model.num_nextn_predict_layers >= 1 on a DeepSeek model); "
                          f"{cfg.model_type} with num_nextn_predict_layers="
                          f"{cfg.num_nextn_predict_layers} has none")
    if (s.kind == "grpo" or s_get(s, "mode") == "on_policy") and \
        s.rows % int(c.train.accum_steps):
      raise ConfigError(f"train.accum_steps={c.train.accum_steps} must divide stages.{name}'s "
                        f"prompts_per_step x group_size = {s.rows}")
  drafts = {"eval.draft": c.get("eval", {}).get("draft", "")}
  drafts.update({f"stages.{n}.draft": stages[n].overrides.get("draft", "") for n in order
                 if stages[n].kind == "eval"})
  from r1jax.rollout.sampler import DRAFTS
  for field, draft in drafts.items():
    if draft not in DRAFTS:
      raise ConfigError(f"{field}={draft!r} must be '' (plain decoding) or 'mtp'")
  reserved = {s_get(stages[n], "rollout_devices", 0) for n in order} - {0}
  if len(reserved) > 1:
    raise ConfigError(f"the GRPO stages ask for different rollout_devices ({sorted(reserved)});"
                      " the run reserves one set of sampling devices")
  if int(c.data.batch_size) <= 0 or int(c.data.seq_len) <= 1:
    raise ConfigError("data.batch_size must be > 0 and data.seq_len > 1")
  context = int(c.mesh.get("context", 1))
  if context > 1 and int(c.data.seq_len) % context:
    raise ConfigError(f"data.seq_len={c.data.seq_len} must be a multiple of mesh.context={context}"
                      " (each context device holds seq_len / context positions of every row)")
  if not 0.0 <= float(c.data.get("rl_uncovered_frac", 0.5)) <= 1.0:
    raise ConfigError(f"data.rl_uncovered_frac={c.data.rl_uncovered_frac} must be in [0, 1]")
  if int(c.data.get("num_heldout_uncovered", 0)) < 0:
    raise ConfigError(f"data.num_heldout_uncovered={c.data.num_heldout_uncovered} must be >= 0")
  if not 0 < float(c.optim.lr) < math.inf:
    raise ConfigError(f"optim.lr={c.optim.lr} must be positive and finite")
  if int(c.train.accum_steps) < 1 or int(c.data.batch_size) % int(c.train.accum_steps):
    raise ConfigError(f"train.accum_steps={c.train.accum_steps} must divide "
                      f"data.batch_size={c.data.batch_size}")
  if c.train.nonfinite not in ("skip", "stop"):
    raise ConfigError(f"train.nonfinite={c.train.nonfinite!r} must be 'skip' or 'stop'")
  if "lora" in c:
    if int(c.lora.rank) < 0:
      raise ConfigError(f"lora.rank={c.lora.rank} must be >= 0 (0 = full fine-tuning)")
    if int(c.lora.rank):
      from r1jax.model import lora
      lcfg = lora.LoraConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha),
                             targets=tuple(c.lora.targets) or lora.DEFAULT_TARGETS,
                             experts=bool(c.lora.experts))
      lora.declare(cfg, lcfg)  # raises for targets this model lacks
      for name in order:
        if s_get(stages[name], "ref_from"):
          raise ConfigError(f"stages.{name}.ref_from cannot be set with LoRA (lora.rank="
                            f"{c.lora.rank}): the reference is the frozen base")
  if int(c.checkpoint.keep) < 1:
    raise ConfigError(f"checkpoint.keep={c.checkpoint.keep} must be >= 1")
  return cfg


def s_get(stage, field: str, default=None):
  """A field of a typed stage config that only some kinds have."""
  return getattr(stage, field, default)


def stage_configs(c) -> dict:
  """{name: typed stage config (r1jax.stages.configs)} of every entry of `stages`."""
  from r1jax.stages import configs
  optim_keys, eval_keys = tuple(c.optim.keys()), tuple(c.eval.keys()) + ("batch_size",)
  return {name: configs.parse(name, section, optim_keys, eval_keys)
          for name, section in c.stages.items()}


def stage_steps(c, stage_cfg) -> int:
  steps = int(stage_cfg.steps)
  return min(steps, int(c.max_steps)) if int(c.max_steps) else steps


def tiny_moe_fields(**overrides) -> dict:
  """The tiny DeepSeek-V3-style MoE of the CPU configs (~2M parameters, every V3 mechanism on:
  q-LoRA MLA, interleaved YaRN RoPE, a dense first layer, sigmoid routing with correction bias,
  group-limited top-k, a shared expert, MTP depth 1)."""
  fields = dict(
      model_type="deepseek_v3", vocab_size=128, hidden_size=128, intermediate_size=256,
      num_hidden_layers=4, num_attention_heads=4,
      # mla
      q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      # moe
      n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=64,
      first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
      # yarn
      max_position_embeddings=1024, original_max_position_embeddings=256, rope_factor=4.0,
      # mtp
      num_nextn_predict_layers=1,
      moe_impl="blocked", capacity_factor=None,  # dropless; the fast path on CPU
      scan_layers=False,  # a loop over 4 layers: 5-10 % faster steps on CPU than lax.scan
      dtype="float32", param_dtype="float32")
  fields.update(overrides)
  return fields


def tiny_student_fields(**overrides) -> dict:
  """A small dense Qwen2-style student sharing the char tokenizer."""
  fields = dict(model_type="qwen2", vocab_size=128, hidden_size=96, intermediate_size=256,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=True, scan_layers=False)
  fields.update(overrides)
  return fields
