"""`--dry_run`: ahead-of-time compile of a train step on abstract inputs, per-device memory and
FLOPs before renting.

Parameters, optimizer state and the batch are ShapeDtypeStructs with their shardings (nothing is
allocated); the SFT step is lowered and compiled for the config's mesh and XLA's memory analysis
gives the temporaries (activations, gradients, communication buffers). On a machine without the
real devices the launcher simulates the mesh with host CPU devices, so the temporary figure is
XLA:CPU's schedule: a guide for GPU/TPU, while parameter and optimizer bytes are exact.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import flops, parallel, run_config, train
from r1jax.errors import UserError
from r1jax.model import params as param_lib
from r1jax.train import state as state_lib

GiB = 1024**3


def needed_devices(config, default: int) -> int:
  sizes = parallel.mesh.axis_sizes(config.mesh.to_dict())
  return math.prod(sizes) if -1 not in sizes else default


def _bytes_per_device(tree) -> int:
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def abstract_state(cfg, tx, mesh):
  """TrainState of ShapeDtypeStructs carrying their shardings."""
  shardings = parallel.param_shardings(cfg, mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        param_lib.abstract(cfg), shardings)
  trainable, bias = state_lib.split_router_bias(params)
  opt = jax.eval_shape(tx.init, trainable)
  _, bias_sh = state_lib.split_router_bias(shardings)
  train_sh, _ = state_lib.split_router_bias(shardings)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt, train_sh,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))
  opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt, opt_sh)
  rep = NamedSharding(mesh, P())
  return state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=trainable, opt_state=opt,
      router_bias=bias, rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))


BACKENDS = ("cpu", "gpu", "tpu")


def _fp8_gemm(backend: str, interpreted_on_cpu: bool = True) -> str:
  """What `pallas_kernels` runs for an FP8 GEMM (1x128 / 128x128 scales) on `backend`."""
  if backend == "tpu":
    return "FP8 GEMM, Pallas kernel (Mosaic TPU; e4m3 widened to bf16 where the MXU lacks FP8)"
  if backend == "gpu":
    if os.environ.get("R1JAX_MOSAIC_GPU", "0") == "1":
      return "FP8 GEMM, Mosaic GPU wgmma kernel (R1JAX_MOSAIC_GPU=1; Hopper)"
    return "FP8 recipe, XLA bf16 dot on e4m3-rounded operands (fallback; R1JAX_MOSAIC_GPU=1 for wgmma)"
  return ("FP8 recipe, Pallas kernel in interpret mode" if interpreted_on_cpu
          else "FP8 recipe, XLA dot on e4m3-rounded operands")


# gmm's fallback off TPU: XLA's ragged_dot expands over every expert on CPU and GPU
XLA_GROUPED = "grouped matmul in plain XLA, (row tile, expert) work items (gmm fallback)"


def _layers(n: int) -> str:
  return f"{n} layer" + ("" if n == 1 else "s")


def kernel_table(cfg, context: int = 1) -> list[str]:
  """Which implementation each part of a layer runs, per backend: what `--dry_run` prints.
  context: the mesh's `context` axis (context parallelism splits the attention's queries).

  Follows the dispatch of `layers.dense`, `moe.routed_experts`, `moe.route_pallas` and
  `pallas_kernels` (Pallas compiles on TPU; on GPU it falls back to XLA unless noted; on CPU it
  interprets)."""
  def linear(b):
    return _fp8_gemm(b) if cfg.fp8 else f"XLA dot ({cfg.dtype})"

  def experts(b):
    impl = cfg.moe_impl
    if impl == "pallas":
      if b == "tpu":
        return "grouped matmul, Pallas kernel (Mosaic TPU)" + (", FP8" if cfg.fp8 else "")
      if b == "gpu":
        return (_fp8_gemm(b) + ", grouped") if cfg.fp8 else XLA_GROUPED
      return "grouped matmul, Pallas kernel in interpret mode" + (", FP8" if cfg.fp8 else "")
    if impl == "ragged_dot":
      if cfg.fp8:
        return _fp8_gemm(b, interpreted_on_cpu=False) + ", grouped (gmm)"
      return "jax.lax.ragged_dot (XLA:TPU)" if b == "tpu" else XLA_GROUPED
    what = {"blocked": "blocked batched matmul, dropless", "dense": "every expert on every token",
            "capacity": f"capacity buffers (capacity_factor {cfg.capacity_factor})"}[impl]
    return what + (", " + _fp8_gemm(b, interpreted_on_cpu=False) if cfg.fp8 else "")

  def attention(b):
    if cfg.attn_impl == "cudnn":
      return ("cuDNN fused attention (jax.nn.dot_product_attention)" if b == "gpu" else
              "none: attn_impl='cudnn' needs a GPU")
    return ("XLA einsum, fp32 softmax"
            + (f", {cfg.attn_chunk}-query chunks" if cfg.attn_chunk else "")
            + (f", {cfg.attn_key_chunk}-key blocks (running softmax; the blocks after a chunk's "
               "last query, and those its mask allows nothing of, skipped)" if cfg.attn_key_chunk
               else "")
            + (f"; positions split over context {context}"
               + (" in zigzag order" if cfg.context_order == "zigzag" else " in order")
               + ", every key gathered ("
               + ("the MLA latent and rope key, expanded on each device)"
                  if cfg.attention == "mla" else "k and v)")
               + (", each device skipping its own blocks" if cfg.attn_key_chunk else "")
               if context > 1 else ""))

  def router(b):
    if cfg.router_impl != "pallas":
      return "jnp top-k (XLA)"
    return {"tpu": "fused router, Pallas kernel (Mosaic TPU)",
            "gpu": "fused router, Pallas kernel (generic pallas_call; not yet compiled on a GPU)",
            "cpu": "fused router, Pallas kernel in interpret mode"}[b]

  attn = ("MLA (q_a, q_b, kv_a, kv_b, o)" if cfg.q_lora_rank else "MLA (q, kv_a, kv_b, o)") \
      if cfg.attention == "mla" else "GQA (q, k, v, o)"
  parts = [(f"attention projections, {attn}", linear),
           ("attention scores and softmax", attention)]
  if cfg.num_dense_layers:
    parts.append((f"dense MLP ({_layers(cfg.num_dense_layers)})", linear))
  if cfg.is_moe:
    parts += [(f"MoE router ({_layers(cfg.num_moe_layers)})", router),
              (f"routed experts, moe_impl={cfg.moe_impl}", experts)]
    if cfg.n_shared_experts:
      parts.append(("shared experts", linear))
  lines = ["kernels per layer part (the same in every layer of its kind; MTP layers as the "
           "main ones):"]
  for name, fn in parts:
    lines.append(f"  {name}:")
    lines += [f"    {b:4s} {fn(b)}" + ("   <- here" if b == jax.default_backend() else "")
              for b in BACKENDS]
  head = f"score head ({cfg.num_labels} labels)" if cfg.num_labels else "lm head"
  lines.append(f"  embeddings, {head}, norms: XLA in model.dtype / fp32" + (
      f"; in the losses the head and its softmax run {cfg.logits_chunk} positions at a time"
      if cfg.logits_chunk and not cfg.num_labels else ""))
  return lines


def report(config, num_devices: int | None = None) -> str:
  cfg = run_config.validate(config)
  n = num_devices or needed_devices(config, jax.device_count())
  if jax.device_count() < n:
    raise UserError(
        f"the dry run's mesh needs {n} devices and this process has {jax.device_count()} "
        f"({jax.default_backend()}); on a CPU, leave XLA_FLAGS without "
        f"--xla_force_host_platform_device_count (the launcher then simulates them), or set it "
        f"to {n}")
  mesh = parallel.make_mesh(config.mesh.to_dict(), jax.devices()[:n])
  _, s = _first_training_stage(config)
  grpo = s is not None and s.kind == "grpo" and not _lora(config) and not s.share_prompt
  if grpo:
    from r1jax.stages import common
    tx, lr = train.make_optimizer(common.merged(config.optim, s.optim), 1000)
  else:
    tx, lr = train.make_optimizer(config.optim, 1000)
  state = abstract_state(cfg, tx, mesh)
  if grpo:
    run_cfg, step, batch, ref, B, T, what = _grpo_update(config, cfg, s, tx, lr, mesh, state)
  else:
    run_cfg = cfg
    B, T = int(config.data.batch_size), int(config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=parallel.batch_sharding((B, T), mesh))
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    loss = train.sft_loss(cfg, mtp_weight=float(config.train.mtp_weight),
                          balance_alpha=float(config.train.balance_alpha))
    step = train.make_step(loss, tx, lr, accum_steps=int(config.train.accum_steps),
                           bias_gamma=float(config.train.bias_gamma), jit=False)
    ref, what = None, "the SFT train step"
  sharding_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  state_sh = sharding_of(state)
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, in_shardings=(state_sh, sharding_of(batch), sharding_of(ref)),
                       out_shardings=(state_sh, None), donate_argnums=(0,)).lower(
                           state, batch, ref).compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  params_b = _bytes_per_device(state.params) + _bytes_per_device(state.router_bias)
  ref_b = _bytes_per_device(ref) if ref is not None else 0
  opt_b = _bytes_per_device(state.opt_state)
  temp_b = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  sizes = dict(zip(parallel.AXES, mesh.devices.shape))
  # optim.mu_dtype sets the first moment only; optax keeps the second in the parameter dtype
  moment_dtypes = " + ".join(sorted({jnp.dtype(x.dtype).name for x in
                                     jax.tree.leaves(state.opt_state) if x.ndim}))
  accum = int(config.train.accum_steps)
  resident_b = params_b + opt_b + ref_b
  rollout = _grpo_rollout(config, run_cfg, s, mesh, state, resident_b) if grpo else []
  lines = [
      f"dry run: {cfg.model_type}, {_count(param_lib.num_params(cfg))} parameters, "
      f"mesh {sizes} ({n} devices), batch {B} x {T} tokens"
      + (f" in {accum} micro-batches" if accum > 1 else "") + f", remat={cfg.remat}",
      f"experts: moe_impl={run_cfg.moe_impl}, expert_dispatch={run_cfg.expert_dispatch}, "
      f"capacity_factor={run_cfg.capacity_factor}"
      + (f", dropless_fast_factor={run_cfg.dropless_fast_factor}"
         if run_cfg.capacity_factor is None and run_cfg.dropless_fast_factor else "")
      + (f", dropless_max_tokens={run_cfg.dropless_max_tokens}"
         if run_cfg.capacity_factor is None and run_cfg.dropless_max_tokens else "")
      + (" (GRPO's policy is dropless: sampler.policy_config)" if grpo and cfg.is_moe else ""),
      f"compiled {what} in {seconds:.1f} s on {jax.devices()[0].platform}",
      "per device:",
      f"  parameters        {params_b / GiB:9.2f} GiB ({cfg.param_dtype})",
      f"  optimizer state   {opt_b / GiB:9.2f} GiB (AdamW moments: {moment_dtypes})",
      f"  temporaries       {temp_b / GiB:9.2f} GiB (activations, gradients, buffers; "
      "XLA memory analysis)",
  ] + ([f"  reference policy  {ref_b / GiB:9.2f} GiB (GRPO's KL term: a copy of the start "
          "parameters)"] if ref is not None else []) + [
      f"  total             {(resident_b + temp_b) / GiB:9.2f} GiB",
  ] + rollout
  mtp = float(config.train.mtp_weight) > 0 and not grpo
  step_flops = flops.train_flops(cfg, B * T, T, mtp=mtp) + (
      flops.forward_flops(cfg, B * T, T) if ref is not None else 0.0)
  lines.append(f"model FLOPs per step: {step_flops:.4g} ({step_flops / n:.4g} per device; "
               f"{_count(flops.matmul_params_per_token(cfg, mtp))} active matmul "
               "parameters per token); a step at 40 % MFU takes "
               + ", ".join(f"{step_flops / (0.4 * flops.PEAK_FLOPS[k] * n):.3g} s on {k}"
                           for k in ("h200", "tpu v5p", "tpu7x")))
  lines += ([] if grpo else _stage_caveat(config)) + _dispatch_hint(run_cfg, sizes["expert"])
  if -1 in parallel.mesh.axis_sizes(config.mesh.to_dict()) and not num_devices:
    lines.append(f"the mesh's -1 axis took the {n} devices at hand; --dry_run_devices N "
                 "(a multiple of the fixed axes) for the slice you plan to rent")
  lines += kernel_table(run_cfg, sizes["context"])
  return "\n".join(lines)


def _first_training_stage(config):
  """(name, typed stage config) of the first stage in stage_order that trains, or (None, None)."""
  stages = run_config.stage_configs(config)
  first = next((n for n in config.stage_order if stages[n].kind in run_config.TRAINING_KINDS),
               None)
  return first, (stages[first] if first else None)


def _lora(config) -> bool:
  return "lora" in config and int(config.lora.rank) > 0


def _grpo_update(config, cfg, s, tx, lr, mesh, state):
  """The GRPO stage's update step on abstract inputs: s.rows rows (prompts x group) of a
  data.seq_len-token prompt and s.max_new_tokens completion tokens, with the reference policy
  when beta > 0. It runs the sampler's policy config (dropless). Returns (policy config, step,
  batch, ref, B, T, description)."""
  from r1jax.rollout import sampler
  from r1jax.stages import grpo as grpo_stage
  from r1jax.train.losses import grpo as grpo_lib
  pcfg = sampler.policy_config(cfg)
  step = train.make_step(grpo_stage.update_loss(pcfg, s), tx, lr,
                         accum_steps=int(config.train.accum_steps),
                         bias_gamma=float(config.train.bias_gamma) if pcfg.is_moe else 0.0,
                         jit=False)
  P, B = _prompt_len(config), s.rows
  T = P + s.max_new_tokens - 1
  T += -T % parallel.position_multiple(mesh, pcfg.context_order)  # `grpo.pad_columns`
  arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=parallel.batch_sharding(shape, mesh))
  routing = None
  if s.routing_replay and pcfg.is_moe:
    routing = arr((B, T, pcfg.num_moe_layers, pcfg.num_experts_per_tok), sampler.ROUTING_DTYPE)
  batch = grpo_lib.GRPOBatch(
      tokens=arr((B, T), jnp.int32), targets=arr((B, T), jnp.int32),
      segment_ids=arr((B, T), jnp.int32), positions=arr((B, T), jnp.int32),
      loss_mask=arr((B, T), jnp.float32), rollout_logprobs=arr((B, T), jnp.float32),
      old_logprobs=arr((B, T), jnp.float32), advantages=arr((B,), jnp.float32),
      routing=routing)
  ref = None
  if s.beta > 0:
    ref = train.full_params(state)  # the start params, laid out as the policy's
  what = (f"the GRPO update of stage {s.name!r} ({B} rows = prompts_per_step x group_size, each "
          f"a {P}-token prompt (data.seq_len{'' if P == config.data.seq_len else ' padded'}) + "
          f"{s.max_new_tokens} new tokens)")
  return pcfg, step, batch, ref, B, T, what


def _prompt_len(config) -> int:
  """A GRPO stage's prompt columns: data.seq_len tokens, left-padded to the sampler's bucket."""
  from r1jax.rollout import sampler
  return -(-int(config.data.seq_len) // sampler.PROMPT_BUCKET) * sampler.PROMPT_BUCKET


def _grpo_rollout(config, pcfg, s, mesh, state, resident_b: int) -> list[str]:
  """The report's lines for a GRPO stage's rollout: `sampler.generate`'s core compiled at the
  stage's rows, with the policy's parameters as the stage passes them. The training state (and
  the reference) stay resident while it runs."""
  from r1jax.rollout import sampler
  P, N = _prompt_len(config), s.max_new_tokens
  t0 = time.time()
  groups = s.group_size  # the stage's rows are runs of G samples of one prompt
  with jax.set_mesh(mesh):
    compiled = sampler.lower(train.full_params(state), pcfg, rows=s.rollout_rows,
                             prompt_len=P, max_new_tokens=N, groups=groups, filtered=s.top_p < 1,
                             record_routing=s.routing_replay, draft=s.draft).compile()
  mem = compiled.memory_analysis()
  temp_b = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  slots = f"{P} + 2 x {N} cache slots, MTP drafts" if s.draft else f"{P} + {N} cache slots"
  return [
      f"compiled the rollout (sampler.generate: {s.rollout_rows} rows, "
      f"{s.rollout_rows // groups} prefilled, {slots}) in {time.time() - t0:.1f} s; per device:",
      f"  rollout temporaries {temp_b / GiB:7.2f} GiB (KV cache, activations, weights gathered "
      "for decoding; XLA memory analysis)",
      f"  rollout total       {(resident_b + temp_b) / GiB:7.2f} GiB (with the parameters, "
      "optimizer state and reference policy, which stay resident)"]


def _stage_caveat(config) -> list[str]:
  """What the report does not cover: it compiles the SFT step at data.batch_size x data.seq_len
  unless the first training stage is GRPO (full fine-tuning, whole rows)."""
  first, s = _first_training_stage(config)
  notes = []
  if _lora(config):
    notes.append(f"note: lora.rank={config.lora.rank}; the figures above are full fine-tuning's "
                 "(the dry run does not build LoRA states)")
  if s is not None and s.kind not in ("sft", "pretrain"):
    why = "GRPO with share_prompt" if s.kind == "grpo" else s.kind
    notes.append(f"note: the first training stage, {first!r}, is {why}; the figures above are "
                 "the SFT step's at data.batch_size x data.seq_len, not its update, which the "
                 "dry run does not compile")
  return notes


def _dispatch_hint(cfg, expert: int) -> list[str]:
  """A note where a dropless MoE on an expert axis runs an exchange whose buffers grow with the
  expert axis: allgather (every token of the group on every device) or all_to_all /
  ragged_all_to_all without fast buffers (the exact bound, ep / min(k, E_loc) x the mean load)."""
  from r1jax.model.moe import dispatch
  if (not cfg.is_moe or cfg.capacity_factor is not None or expert <= 1
      or dispatch.has_fast_buffers(cfg)):
    return []
  if cfg.expert_dispatch == "allgather":
    what = "allgather gathers every token of the expert group onto each device"
  else:
    what = (f"{cfg.expert_dispatch} without dropless_fast_factor sizes its buffers for the "
            "exact bound, expert / min(k, local experts) x the mean load")
  return [f"note: dropless experts on a {expert}-way expert axis: {what}; "
          "--config.model.expert_dispatch=all_to_all --config.model.dropless_fast_factor=2.0 "
          "sizes them by the load (model/moe/dispatch.py _dropless)"]


def _count(x: float) -> str:
  """12.3B, 456.7M, 1.8M: a parameter count a reader takes in at a glance."""
  return f"{x / 1e9:.1f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"
