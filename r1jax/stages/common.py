"""What every stage shares: the run context and one resumable training loop.

The loop resumes from the stage's newest complete checkpoint (train state + data-iterator state +
loop state), so a run killed at any point and started again with the same workdir continues
exactly where it was; SIGTERM saves a checkpoint and exits with status 143.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from r1jax import parallel, run_config
from r1jax.checkpoint import Checkpointer, abstract_like
from r1jax.model.config import ModelConfig
from r1jax.errors import NonFiniteError
from r1jax.runlog import RunLog
from r1jax.train import state as state_lib




@dataclasses.dataclass
class Context:
  config: Any  # the ml_collections run config
  workdir: epath.Path  # a filesystem path or gs:// (r1jax.fileio)
  model_cfg: ModelConfig  # the policy's
  tokenizer: Any
  mesh: Any
  log: RunLog
  models: dict  # name -> (ModelConfig, params); "policy" always, "student" after distill
  is_main: bool = True
  splits: dict | None = None  # task splits: sft / rl / eval records
  outputs: dict = dataclasses.field(default_factory=dict)  # stage name -> (cfg, params)
  peak_flops: float = float("nan")  # the job's peak FLOP/s (r1jax.flops), for MFU
  rollout_mesh: Any = None  # asynchronous GRPO's own sampling devices (`rollout_devices`)
  # LoRA stages: name -> (LoraConfig, {"adapters", "router_bias"}): what the stage's output holds
  lora_outputs: dict = dataclasses.field(default_factory=dict)

  def stage_dir(self, name: str) -> epath.Path:
    return self.workdir / "checkpoints" / name

  def seed(self, name: str) -> int:
    """A per-stage seed derived from the run seed and the whole stage name (stages do not share
    random streams: `grpo` and `grpo_final` draw different prompts and samples)."""
    return derived_seed(int(self.config.seed), name)


def derived_seed(seed: int, name: str) -> int:
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 32, 4)]
  return int(np.random.default_rng([seed, *words]).integers(2**31))


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._prev = None

  def __enter__(self):
    try:
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._prev = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def _any_process(flag: bool) -> bool:
  """True on every process if it is true on any: processes stop (preemption, wall budget) at
  the same step, so they save the same checkpoint and run the same collectives."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def shard(ctx: Context, batch):
  """The global host batch (the same on every process) -> global arrays split over the batch
  axes; each process places the rows of its own devices (`parallel.global_batch`)."""
  return parallel.global_batch(batch, ctx.mesh)


def barrier(name: str) -> None:
  """Every process waits here for the others (no-op with one process): files process 0 wrote
  before it are there for everyone after it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def train_loop(ctx: Context, name: str, state, *, steps: int,
               next_batch: Callable[[Any], tuple[Any, dict]], data_iter,
               update: Callable, log_keys=("loss",), overlap: bool = True
               ) -> tuple[Any, dict]:
  """Run `steps` updates of a stage, resumably.

  next_batch(state) -> (device batch, host metrics) draws the next batch (for GRPO it samples
  rollouts); update(state, batch) -> (state, metrics) is the jitted step. `data_iter` is the
  grain iterator whose state is checkpointed (or None).
  overlap: fetch a step's metrics after the next step's dispatch (below). False fetches them at
  once: for GRPO, whose next batch is sampled from the updated policy, so it waits for the step
  anyway, and its step_seconds and rollout_seconds are then its own step's.
  Returns (final state, final metrics).
  """
  c = ctx.config
  ckpt = Checkpointer(ctx.stage_dir(name), keep=int(c.checkpoint.keep),
                      every_steps=int(c.checkpoint.every_steps),
                      async_save=bool(c.checkpoint.async_save))
  start, last = 0, {}
  # a LoRA state's frozen base is not checkpointed: it is where the stage started from
  restored = ckpt.restore(abstract_like(_saved_part(state)))
  if restored is not None:
    state, extra, start = _with_base(restored[0], state), restored[1], restored[2]
    if data_iter is not None and extra.get("data") is not None:
      data_iter.set_state(extra["data"])
    last = extra.get("metrics", {})
    ctx.log.info(f"[{name}] resumed from step {start}")

  def save(step, metrics):
    extra = {"data": data_iter.get_state() if data_iter is not None else None,
             "metrics": metrics}
    ctx.log.flush()  # the metrics up to a checkpoint outlive a kill (gs:// buffers them)
    ckpt.save(step, _saved_part(state), extra)

  every = max(int(c.log.every_steps), 1)
  # A step's metrics come to the host only after the next step has been dispatched, so the host
  # (building the next batch, logging) works while the device runs a step, instead of waiting
  # on `device_get` every step. A step that saves a checkpoint, and the last one, fetch theirs
  # at once: a checkpoint is written only after its step's metrics were checked. step_seconds
  # is the time between two steps' metrics arriving: the loop's period, compiles included.
  clock = time.time()

  def finish(step, device_metrics, host_metrics):
    nonlocal last, clock
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    metrics.update(host_metrics)
    now = time.time()
    metrics["step_seconds"], clock = now - clock, now
    _throughput(metrics, last.get("flops_total", 0.0), ctx.peak_flops)
    if metrics.get("nonfinite", 0) and c.train.nonfinite == "stop":
      ckpt.close()  # an asynchronous save of the last good step must commit before we exit
      ctx.log.flush()
      raise NonFiniteError(f"stage {name}: non-finite loss, gradient or update at step {step} "
                           "(train.nonfinite=stop); the last good checkpoint is kept")
    last = metrics
    if step % every == 0 or step == steps or step == 1:
      rec = ctx.log.metrics(name, step, metrics)
      ctx.log.progress(name, step, steps, rec, log_keys)

  pending = None  # (step, device metrics, host metrics) of a dispatched step not yet fetched
  with _Preemption() as pre:
    for step in range(start + 1, steps + 1):
      batch, host_metrics = next_batch(state)
      state, metrics = update(state, batch)
      if pending is not None:
        finish(*pending)
      pending = (step, metrics, host_metrics)
      preempted = _any_process(pre.requested)
      if step == steps or ckpt.should_save(step) or preempted or not overlap:
        finish(*pending)
        pending = None
        save(step, last)
      if preempted:
        ckpt.close()
        ctx.log.info(f"[{name}] SIGTERM: saved step {step}, exiting")
        sys.exit(143)
  if start >= steps and restored is None:
    save(steps, last)
  ckpt.close()
  return state, last


def _saved_part(state):
  """What a checkpoint holds of a stage's state (a TrainState, or GRPO's {train, ref})."""
  if isinstance(state, dict):
    return {k: _saved_part(v) for k, v in state.items()}
  return state_lib.without_base(state) if isinstance(state, state_lib.TrainState) else state


def _with_base(restored, like):
  if isinstance(like, dict):
    return {k: _with_base(restored[k], v) for k, v in like.items()}
  if isinstance(like, state_lib.TrainState) and like.base is not None:
    return restored.replace(base=like.base)
  return restored


def _throughput(metrics: dict, flops_before: float, peak_flops: float) -> None:
  """tokens_per_sec, model FLOP/s, MFU and the stage's running FLOP total, in place. `flops` is
  the step's model FLOPs (r1jax.flops), set by the stage."""
  seconds = max(metrics["step_seconds"], 1e-9)
  if "tokens" in metrics:
    metrics["tokens_per_sec"] = metrics["tokens"] / seconds
  if "flops" in metrics:
    metrics["flops_total"] = flops_before + metrics["flops"]
    metrics["model_flops_per_sec"] = metrics["flops"] / seconds
    metrics["mfu"] = metrics["model_flops_per_sec"] / peak_flops


class SampleLog:
  """samples/<stage>.jsonl: one sample per log step of a sampling stage (GRPO, on-policy
  distillation), written as they come. Only process 0 writes. A stage resumed from a checkpoint
  keeps the samples written before it and rewrites the steps after it."""

  def __init__(self, ctx: Context, name: str):
    self.ctx, self.path = ctx, ctx.workdir / "samples" / f"{name}.jsonl"
    self.every = max(int(ctx.config.log.every_steps), 1)
    self.samples = []
    if ctx.is_main and self.path.exists():  # an interrupted earlier attempt's
      with self.path.open() as f:
        self.samples = [json.loads(line) for line in f if line.strip()]

  def add(self, step: int, record: dict) -> None:
    if not self.ctx.is_main or step % self.every:
      return
    from r1jax.data import pipeline
    self.samples = [x for x in self.samples if x["step"] < step] + [{"step": step, **record}]
    pipeline.write_jsonl(self.path, self.samples)


def lora_config(ctx: Context):
  """The run's LoRA settings (config section `lora`; rank 0 = full fine-tuning), or None."""
  section = ctx.config.get("lora")
  if section is None or int(section.rank) == 0:
    return None
  from r1jax.model import lora
  return lora.LoraConfig(rank=int(section.rank), alpha=float(section.alpha),
                         targets=tuple(section.targets) or lora.DEFAULT_TARGETS,
                         experts=bool(section.experts))


def record_lora_output(ctx: Context, name: str, state) -> None:
  """A LoRA stage's output is its adapters and correction biases, on top of its base."""
  if state.lora is not None:
    ctx.lora_outputs[name] = (state.lora, {"adapters": state.params,
                                           "router_bias": state.router_bias})


def new_state(ctx: Context, params, tx, name: str, cfg: ModelConfig | None = None,
              lora_cfg=None):
  """A fresh train state, on a copy of `params`, placed on the mesh.

  The copy: the step donates its state, and the stage's input model may still be needed (a
  control branch, the GRPO reference model). Leaves created outside jit (step, rng, optimizer
  counts) sit on one device; they are replicated over the mesh, so that a state restored from a
  checkpoint (which keeps each leaf's sharding) can enter the jitted step under the mesh. This
  holds on a one-device mesh too: the step returns those leaves with a mesh sharding, and a
  first step fed single-device leaves would compile the step a second time at step 2."""
  adapters = None
  if lora_cfg is not None:
    from r1jax.model import lora
    adapters = lora.init_sharded(cfg, lora_cfg, params,
                                 jax.random.PRNGKey(ctx.seed(name + "/lora")), ctx.mesh)
  state = state_lib.create(jax.tree.map(jnp.copy, params), tx, ctx.seed(name), adapters=adapters,
                           lora_cfg=lora_cfg)
  replicated = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.device_put(x, replicated)
                      if isinstance(x.sharding, jax.sharding.SingleDeviceSharding) else x, state)


def stage_steps(ctx: Context, stage_cfg) -> int:
  return run_config.stage_steps(ctx.config, stage_cfg)


def merged(base, override):
  """`base` ConfigDict section with override values (a stage's optim or eval overrides)."""
  out = base.copy_and_resolve_references()
  for k, v in (override or {}).items():
    if k in out:
      out[k] = v
  return out

