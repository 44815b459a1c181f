"""The R1 recipe: stages from `config.stages`, run in `config.stage_order`, resumable.

Each finished stage writes its output model under `outputs/<stage>/` and is recorded in
`progress.json`; a run started again with the same workdir skips finished stages (loading their
outputs) and resumes the unfinished one from its last complete checkpoint. `summary.json` is
rewritten after every stage.

Every process runs the same recipe on the same global data and reaches the same decisions;
process 0 alone writes the shared files (summary, progress, samples, logs), and the processes
meet at a barrier after each stage, so a stage never reads a file another process has yet to
write.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import ml_collections
from etils import epath

from r1jax import fileio, flops, hf, parallel, run_config
from r1jax.checkpoint import load_model, save_model, saved_lora_config, sources
from r1jax.errors import ConfigError
from r1jax.data import pipeline as data_pipeline
from r1jax.data import tasks
from r1jax.data.tokenizer import get_tokenizer
from r1jax.errors import DataError
from r1jax.runlog import RunLog
from r1jax.stages import common, evaluate, sft

TRAINING_KINDS = ("pretrain", "sft", "grpo", "distill", "reward_model")
# model fields a run's config sets even over an HF checkpoint's own (how to run, not what it is)
RUN_MODEL_FIELDS = ("dtype", "moe_impl", "capacity_factor", "remat", "scan_layers", "attn_chunk",
                    "logits_chunk", "attn_impl", "expert_dispatch", "fp8", "router_impl",
                    "router_group_fill")


def _runner(kind: str):
  if kind in ("pretrain", "sft"):
    return sft.run_sft
  if kind == "distill":
    return sft.run_distill
  if kind == "eval":
    return evaluate.run_eval
  if kind == "reward_model":
    from r1jax.stages import reward_model
    return reward_model.run_reward_model
  from r1jax.stages import grpo, rejection  # RL stages pull in the sampler and rewards
  return {"grpo": grpo.run_grpo, "rejection_sampling": rejection.run_rejection}[kind]


def make_splits(c) -> dict:
  d = c.data
  if d.task == "arithmetic":
    return tasks.arithmetic_splits(
        int(c.seed), n_sft=int(d.num_sft_examples), n_rl=int(d.num_rl_prompts),
        n_eval=int(d.num_eval_problems), covered_digits=tuple(d.covered_digits),
        uncovered_digits=tuple(d.uncovered_digits), covered_operands=int(d.covered_operands),
        uncovered_operands=int(d.uncovered_operands),
        rl_uncovered_frac=float(d.rl_uncovered_frac),
        uncovered_traces=int(d.get("uncovered_traces", 0)),
        covered_long_operands=d.get("covered_long_operands", None),
        trace_both_orders=bool(d.get("trace_both_orders", False)),
        n_heldout=int(d.get("num_heldout_uncovered", 0)))
  if d.task == "word_arithmetic":
    lo, hi = tuple(d.covered_digits)
    return tasks.word_problem_splits(int(c.seed), n_rl=int(d.num_rl_prompts),
                                     n_eval=int(d.num_eval_problems), min_digits=lo,
                                     max_digits=hi)
  if d.task == "file":
    fields = dict(prompt_field=d.prompt_field, answer_field=d.answer_field)
    splits = {"sft": [], "rl": [], "eval": []}
    if d.train_file:
      splits["rl"] = data_pipeline.read_records(d.train_file, **fields)
    if d.eval_file:
      splits["eval"] = data_pipeline.read_records(d.eval_file, **fields)
    return splits
  raise ConfigError(f"data.task={d.task!r} must be 'arithmetic', 'word_arithmetic' or 'file'")


def split_sizes(splits: dict) -> dict:
  """{split: {"total": n, bucket: n, ...}} for summary.json."""
  out = {}
  for name, records in splits.items():
    entry = {"total": len(records)}
    for r in records:
      if r.get("bucket"):
        entry[r["bucket"]] = entry.get(r["bucket"], 0) + 1
    out[name] = entry
  return out


def provenance(argv=None) -> dict:
  """What produced a run: the command line, the git commit of the code (when it runs from a git
  checkout) and the jax version; summary.json carries it."""
  import os
  import subprocess
  import sys
  commit = None
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                            capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    pass
  args = list(sys.argv if argv is None else argv)
  return {"command": " ".join(["python -m r1jax.launch"] + args[1:]), "git_commit": commit,
          "jax": jax.__version__, "processes": jax.process_count(),
          "devices": jax.device_count()}


class Recipe:

  def __init__(self, config, workdir, run_info: dict | None = None):
    self.run_info = run_info or {}
    self.config = config
    # absolute (orbax needs it) whatever the caller passed; a URL stays as it is
    self.workdir = fileio.absolute(workdir)
    cfg = run_config.validate(config)
    self.stages = run_config.stage_configs(config)  # typed (r1jax.stages.configs)
    self.is_main = jax.process_index() == 0
    # asynchronous GRPO may sample on devices of its own; every stage trains on the others
    reserved = max(run_config.s_get(self.stages[n], "rollout_devices", 0)
                   for n in config.stage_order)
    train_devices, rollout_devices = parallel.split_devices(reserved)
    mesh = parallel.make_mesh(config.mesh.to_dict(), train_devices)
    rollout_mesh = parallel.make_mesh({"data": -1}, rollout_devices) if reserved else None
    tokenizer = get_tokenizer(sources.resolve(config.data.tokenizer))
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size})")
    log = RunLog(self.workdir, enabled=self.is_main, tensorboard=bool(config.log.tensorboard))
    self.ctx = common.Context(config=config, workdir=self.workdir, model_cfg=cfg,
                              tokenizer=tokenizer, mesh=mesh, rollout_mesh=rollout_mesh,
                              log=log, models={},
                              is_main=self.is_main, splits=make_splits(config),
                              peak_flops=flops.device_peak_flops())
    self.progress_path = self.workdir / "progress.json"

  def _initial_policy(self):
    c, cfg = self.config, self.ctx.model_cfg
    if c.init_from:
      loaded_cfg, params = hf.load(sources.resolve(c.init_from), dtype=cfg.jnp_param_dtype)
      cfg = loaded_cfg.replace(**{k: getattr(cfg, k) for k in RUN_MODEL_FIELDS})
      return cfg, parallel.shard_params(params, cfg, self.ctx.mesh)
    return cfg, parallel.init_sharded(cfg, self.ctx.mesh, jax.random.PRNGKey(int(c.seed)))

  def _progress(self) -> dict:
    if not self.progress_path.exists():
      return {"completed": [], "summary": []}
    try:
      return json.loads(self.progress_path.read_text())
    except (OSError, ValueError) as e:
      raise DataError(f"{self.progress_path}: unreadable ({e}); remove it to start over") from None

  def _summary(self, progress) -> dict:
    out = {"splits": split_sizes(self.ctx.splits), "stages": progress["summary"]}
    if self.run_info:
      out["run"] = self.run_info
    return out

  def run(self) -> dict:
    ctx, c = self.ctx, self.config
    ctx.models["policy"] = self._initial_policy()
    progress = self._progress()
    for name in c.stage_order:
      stage_cfg = self.stages[name]
      out_dir = self.workdir / "outputs" / name
      if name in progress["completed"]:
        self._reload(name, stage_cfg.kind, out_dir)
        continue
      t0 = time.time()
      ctx.log.info(f"== stage {name} ({stage_cfg.kind}) ==")
      policy, student = ctx.models["policy"], ctx.models.get("student")
      # (distill: the student's start; reward_model: its trunk's, the policy stays)
      if stage_cfg.start_from and stage_cfg.kind not in ("distill", "reward_model"):
        ctx.models["policy"] = ctx.outputs[stage_cfg.start_from]
      if run_config.s_get(stage_cfg, "match_compute_of"):
        stage_cfg = self._compute_matched(name, stage_cfg, progress)
      result = _runner(stage_cfg.kind)(ctx, name, stage_cfg)
      metrics, eval_out = result if isinstance(result, tuple) else (result, None)
      which = {"distill": "student", "reward_model": "reward"}.get(stage_cfg.kind, "policy")
      if stage_cfg.kind in TRAINING_KINDS:
        # a reward model evaluates itself (pairwise accuracy on held-out pairs); it cannot solve
        # problems
        generates = stage_cfg.kind != "reward_model"
        if eval_out is None and stage_cfg.eval and ctx.splits["eval"] and generates:
          cfg, params = ctx.models[which]
          eval_out = evaluate.evaluate(ctx, cfg, params, ctx.splits["eval"],
                                       seed=ctx.seed(name + "/eval"),
                                       template=stage_cfg.template or c.data.template,
                                       eval_cfg=c.eval, stage=name)
        if eval_out is not None and ctx.splits.get("heldout") and generates:
          eval_out["heldout"] = self._heldout_eval(name, stage_cfg, *ctx.models[which])
        if name in ctx.lora_outputs:  # adapters and biases only; the base is the stage's input
          lora_cfg, trained = ctx.lora_outputs[name]
          save_model(out_dir, ctx.models[which][0], trained, lora=lora_cfg)
        else:
          save_model(out_dir, *ctx.models[which])  # every process writes its shards
        ctx.outputs[name] = ctx.models[which]
      if stage_cfg.branch:  # a control branch: the recipe continues from before it
        ctx.models["policy"] = policy
        if student is not None:
          ctx.models["student"] = student
      entry = {"name": name, "kind": stage_cfg.kind, "wall_seconds": round(time.time() - t0, 2),
               "metrics": {k: v for k, v in (metrics or {}).items() if not k.startswith("_")}}
      if stage_cfg.kind in TRAINING_KINDS:
        entry["steps"] = int(run_config.stage_steps(c, stage_cfg))
      if eval_out is not None:
        entry["eval"] = eval_out
        scalars = {"eval_accuracy": eval_out.get("accuracy", eval_out.get("pass@1"))}
        shown = [f"{k}={v:.3f}" for k, v in eval_out.items() if isinstance(v, float)]
        if "heldout" in eval_out:
          scalars["heldout_accuracy"] = eval_out["heldout"]["accuracy"]
          shown.append(f"heldout accuracy={eval_out['heldout']['accuracy']:.3f} "
                       f"({eval_out['heldout']['num_problems']} problems)")
        ctx.log.metrics(name, int(run_config.stage_steps(c, stage_cfg)), scalars)
        ctx.log.info(f"[{name}] eval: " + ", ".join(shown))
      progress["completed"].append(name)
      progress["summary"].append(entry)
      if self.is_main:
        ctx.log.flush()
        fileio.atomic_write_json(self.workdir / "summary.json", self._summary(progress))
        fileio.atomic_write_json(self.progress_path, progress)
        if c.log.plots:
          ctx.log.plot(progress["summary"])
      common.barrier(f"stage {name} done")
    ctx.log.close()
    return self._summary(progress)

  def _heldout_eval(self, name: str, stage_cfg, cfg, params) -> dict:
    """Greedy accuracy on the large uncovered held-out set (`data.num_heldout_uncovered`)."""
    c, records = self.config, self.ctx.splits["heldout"]
    greedy_only = ml_collections.ConfigDict(dict(c.eval.to_dict(), k=0, greedy=True))
    out = evaluate.evaluate(self.ctx, cfg, params, records, seed=self.ctx.seed(name + "/heldout"),
                            template=stage_cfg.template or c.data.template,
                            eval_cfg=greedy_only)
    return {"accuracy": out["accuracy"], "num_problems": out["num_problems"]}

  def _compute_matched(self, name: str, stage_cfg, progress):
    """An SFT control stage given the model FLOPs that stage `match_compute_of` spent
    (generation + updates for GRPO): its step count is that total over one SFT step's FLOPs.
    Deterministic: the FLOPs come from token counts, not from a clock."""
    ref = stage_cfg.match_compute_of
    entry = next((e for e in progress["summary"] if e["name"] == ref), None)
    if entry is None or "flops_total" not in entry.get("metrics", {}):
      raise ConfigError(f"stages.{name}.match_compute_of={ref!r} names no finished training "
                        "stage before it")
    c = self.config
    cfg = self.ctx.models["policy"][0]
    if stage_cfg.kind == "distill":  # a distillation control: the student's steps
      per_step = sft.distill_step_flops(self.ctx, stage_cfg,
                                        sft.teacher_model(self.ctx, stage_cfg)[0])
    else:
      weight = c.train.mtp_weight if stage_cfg.mtp_weight is None else stage_cfg.mtp_weight
      mtp = float(weight) > 0 and cfg.is_moe and cfg.num_nextn_predict_layers > 0
      per_step = sft.sft_step_flops(self.ctx, cfg, use_mtp=mtp)
    steps = max(1, math.ceil(entry["metrics"]["flops_total"] / per_step))
    self.ctx.log.info(f"[{name}] {steps} steps: the {entry['metrics']['flops_total']:.3g} model "
                      f"FLOPs of {ref} at {per_step:.3g} per SFT step")
    return dataclasses.replace(stage_cfg, steps=steps)

  def _reload(self, name: str, kind: str, out_dir: epath.Path):
    """Load a finished stage's output model so later stages start from it."""
    ctx = self.ctx
    if kind not in TRAINING_KINDS:
      return
    if kind == "distill":
      s_cfg = sft.student_config(ctx, self.stages[name])
      like = parallel.abstract_params(s_cfg, ctx.mesh)
      ctx.models["student"] = ctx.outputs[name] = (s_cfg, load_model(out_dir, like))
    elif kind == "reward_model":
      from r1jax.stages import reward_model
      rm_cfg = reward_model.reward_model_config(
          reward_model.base_model(ctx, self.stages[name])[0])
      like = parallel.abstract_params(rm_cfg, ctx.mesh)
      ctx.models["reward"] = ctx.outputs[name] = (rm_cfg, load_model(out_dir, like))
    else:
      s = self.stages[name]
      cfg, base = ctx.outputs[s.start_from] if s.start_from else ctx.models["policy"]
      lora_cfg = saved_lora_config(out_dir)
      if lora_cfg is None:
        params = load_model(out_dir, base)
      else:  # a LoRA stage: its adapters and correction biases on top of its input model
        from r1jax.model import lora
        from r1jax.train import state as state_lib
        model_part, bias = state_lib.split_router_bias(base)
        trained = load_model(out_dir, {"adapters": lora.abstract_sharded(cfg, lora_cfg, ctx.mesh),
                                       "router_bias": bias})
        params = state_lib.merge_router_bias(lora.merge(model_part, trained["adapters"], lora_cfg),
                                             trained["router_bias"])
      ctx.outputs[name] = (cfg, params)
      if not s.branch:
        ctx.models["policy"] = ctx.outputs[name]
    ctx.log.info(f"[{name}] already complete; loaded its output")
