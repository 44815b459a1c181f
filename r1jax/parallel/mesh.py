"""The device mesh: axes `data`, `fsdp`, `expert`, `context`, `tensor` built from the config's
`mesh` section.

Axis sizes of -1 take the rest of the devices (at most one). Axes are `Auto` (GSPMD propagates
shardings from the jit in/out shardings); expert dispatch uses `jax.shard_map` explicitly.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from r1jax.axes import AXES, BATCH_AXES, batch_axes, context_size  # noqa: F401  (re-exported)
from r1jax.errors import ConfigError


def position_multiple(mesh, context_order: str) -> int:
  """What a row's positions are padded to a multiple of (a GRPO update's columns): the context
  axis's size, twice that for the zigzag order (`model.layers.zigzag_slots`); 1 without one."""
  cp = context_size(mesh)
  return cp * 2 if cp > 1 and context_order == "zigzag" else cp


def axis_sizes(mesh_cfg: Mapping[str, int]) -> list[int]:
  """The config's size of each axis in AXES order, -1 for "the rest"; checked without devices."""
  sizes = []
  for a in AXES:
    v = int(mesh_cfg.get(a, 1))
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{a}={v} must be a positive size or -1 (the rest)")
    sizes.append(v)
  unknown = sorted(set(mesh_cfg) - set(AXES))
  if unknown:
    raise ConfigError(f"mesh.{unknown[0]} is not a mesh axis (axes: {', '.join(AXES)})")
  if sizes.count(-1) > 1:
    raise ConfigError("mesh: at most one axis may be -1")
  return sizes


def simulated_devices(mesh_cfg: Mapping[str, int]) -> int:
  """How many host devices a dry run simulates for this mesh: its size, or with a -1 axis (the
  rest) about 8, a multiple of the fixed axes (at least one device per position of them)."""
  sizes = axis_sizes(mesh_cfg)
  fixed = math.prod(s for s in sizes if s != -1)
  return fixed if -1 not in sizes else fixed * max(1, 8 // fixed)


def resolve_axis_sizes(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  sizes = axis_sizes(mesh_cfg)
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                        f"(product {fixed})")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh: axis sizes {dict(zip(AXES, sizes))} need {math.prod(sizes)} "
                      f"devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with the named axes (AXES)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axis_sizes(dict(mesh_cfg or {"data": -1}), len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def split_devices(rollout_devices: int) -> tuple[list, list]:
  """(the training devices, the sampler's devices) for asynchronous GRPO's `rollout_devices`:
  the last rollout_devices / processes local devices of every process sample, the rest train.
  Both lists are ordered by process, so both meshes span every process."""
  devices, procs = list(jax.devices()), jax.process_count()
  if rollout_devices == 0:
    return devices, []
  if rollout_devices % procs:
    raise ConfigError(f"rollout_devices={rollout_devices} is not a multiple of the "
                      f"{procs} processes (each gives the same number)")
  if procs > 1 and devices[0].platform == "cpu":
    # measured: the update's gradient all-reduce and a concurrent collective on the sampling
    # devices (the loop's preemption vote) crossed messages in gloo and aborted the run
    raise ConfigError(f"rollout_devices={rollout_devices} with {procs} processes needs "
                      "collectives that may run at once on disjoint devices (GPU, TPU); "
                      "XLA:CPU's gloo mixes them up: use rollout_devices=0 on CPU")
  own = rollout_devices // procs
  local = jax.local_device_count()
  if own >= local:
    raise ConfigError(f"rollout_devices={rollout_devices} leaves no training device: each of "
                      f"the {procs} processes has {local} devices")
  train, rollout = [], []
  for p in range(procs):
    mine = [d for d in devices if d.process_index == p]
    train += mine[:len(mine) - own]
    rollout += mine[len(mine) - own:]
  return train, rollout


def abstract_mesh(mesh_cfg: Mapping[str, int], num_devices: int):
  """A device-free mesh of `num_devices` for ahead-of-time compilation and memory estimates."""
  sizes = resolve_axis_sizes(dict(mesh_cfg), num_devices)
  return jax.sharding.AbstractMesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_size_multiple(mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))
