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
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import flops, parallel, run_config, train
from r1jax.model import params as param_lib
from r1jax.train import state as state_lib

GiB = 1024**3


def needed_devices(config, default: int) -> int:
  sizes = [int(config.mesh.get(a, 1)) for a in parallel.AXES]
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


def report(config, num_devices: int | None = None) -> str:
  cfg = run_config.validate(config)
  n = num_devices or needed_devices(config, jax.device_count())
  if jax.device_count() < n:
    raise RuntimeError(f"dry run needs {n} devices, have {jax.device_count()}")
  mesh = parallel.make_mesh(config.mesh.to_dict(), jax.devices()[:n])
  tx, lr = train.make_optimizer(config.optim, 1000)
  state = abstract_state(cfg, tx, mesh)
  B, T = int(config.data.batch_size), int(config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                   sharding=parallel.batch_sharding((B, T), mesh))
           for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
  loss = train.sft_loss(cfg, mtp_weight=float(config.train.mtp_weight),
                        balance_alpha=float(config.train.balance_alpha))
  step = train.make_step(loss, tx, lr, accum_steps=int(config.train.accum_steps),
                         bias_gamma=float(config.train.bias_gamma), jit=False)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, batch)),
                       out_shardings=(state_sh, None), donate_argnums=(0,)).lower(
                           state, batch).compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  params_b = _bytes_per_device(state.params) + _bytes_per_device(state.router_bias)
  opt_b = _bytes_per_device(state.opt_state)
  temp_b = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  sizes = dict(zip(parallel.AXES, mesh.devices.shape))
  # optim.mu_dtype sets the first moment only; optax keeps the second in the parameter dtype
  moment_dtypes = " + ".join(sorted({jnp.dtype(x.dtype).name for x in
                                     jax.tree.leaves(state.opt_state) if x.ndim}))
  lines = [
      f"dry run: {cfg.model_type}, {param_lib.num_params(cfg) / 1e9:.1f}B parameters, "
      f"mesh {sizes} ({n} devices), batch {B} x {T} tokens, remat={cfg.remat}",
      f"experts: moe_impl={cfg.moe_impl}, expert_dispatch={cfg.expert_dispatch}, "
      f"capacity_factor={cfg.capacity_factor}",
      f"compiled the SFT train step in {seconds:.1f} s on {jax.devices()[0].platform}",
      "per device:",
      f"  parameters        {params_b / GiB:9.2f} GiB ({cfg.param_dtype})",
      f"  optimizer state   {opt_b / GiB:9.2f} GiB (AdamW moments: {moment_dtypes})",
      f"  temporaries       {temp_b / GiB:9.2f} GiB (activations, gradients, buffers; "
      "XLA memory analysis)",
      f"  total             {(params_b + opt_b + temp_b) / GiB:9.2f} GiB",
  ]
  mtp = float(config.train.mtp_weight) > 0
  step_flops = flops.train_flops(cfg, B * T, T, mtp=mtp)
  lines.append(f"model FLOPs per step: {step_flops:.4g} ({step_flops / n:.4g} per device; "
               f"{flops.matmul_params_per_token(cfg, mtp) / 1e9:.2f}B active matmul "
               "parameters per token); a step at 40 % MFU takes "
               + ", ".join(f"{step_flops / (0.4 * flops.PEAK_FLOPS[k] * n):.3g} s on {k}"
                           for k in ("h200", "tpu v5p", "tpu7x")))
  return "\n".join(lines)
