"""Logical axis names -> mesh axes. The one place that knows how the model is laid out.

Dense weights shard their model dimension over `fsdp` (and `expert`, which is plain data
parallelism outside the MoE layers, and `context`, whose devices hold other positions of the
same rows); expert weights shard the expert dimension over `expert`; heads and FFN widths over
`tensor`. Weights without a model dimension (MLA's up-projections q_b [q_lora, H, hd] and kv_b
[kv_lora, H, hd], stacked norms [L, D]) shard their input dimension over `fsdp` x `expert` x
`context` the same way, so no large weight (nor its gradient and AdamW moments) is replicated.
Batches split their rows over the batch axes and their positions over `context`. A mesh axis
is used at most once per array, and an axis is dropped for a dimension it does not divide
(small models on big meshes stay correct).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax.axes import BATCH_AXES, CONTEXT, MODEL_DIM_AXES, dividing
from r1jax.model import params as param_lib

RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "seq": (CONTEXT,),
    "embed": MODEL_DIM_AXES,
    # inputs of weights that have no `embed` dim, sharded like it (FSDP: gathered where used);
    # in weights that do have one (q_a [D, q_lora], eh_proj [2D, D]) `embed` claims the axes first
    "q_lora": MODEL_DIM_AXES,
    "kv_lora": MODEL_DIM_AXES,
    "mtp_in": MODEL_DIM_AXES,
    "norm": MODEL_DIM_AXES,
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "moe_mlp": ("tensor",),
    "exp": ("expert",),
}
# dimensions sharded first claim their mesh axes first (experts before the model dimension)
PRIORITY = ("exp", "batch", "seq", "vocab", "heads", "kv_heads", "mlp", "moe_mlp", "embed")


def spec_for(axes, shape, mesh, rules=RULES) -> P:
  """PartitionSpec for an array with logical `axes` and `shape` on `mesh`."""
  used: set[str] = set()
  out: list = [None] * len(axes)
  order = sorted(range(len(axes)), key=lambda i: PRIORITY.index(axes[i])
                 if axes[i] in PRIORITY else len(PRIORITY))
  for i in order:
    free = tuple(m for m in rules.get(axes[i], ()) if m not in used) if axes[i] else ()
    chosen = dividing(mesh, shape[i], free)
    used.update(chosen)
    out[i] = tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None)
  return P(*out)


def param_specs(cfg, mesh, rules=RULES):
  """PartitionSpecs of every parameter of `cfg`, from its one declaration."""
  return param_lib.map_specs(lambda s: spec_for(s.axes, s.shape, mesh, rules), cfg)


def param_shardings(cfg, mesh, rules=RULES):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, rules))


def batch_spec(shape, mesh) -> P:
  """Leading (batch) dimension over the batch axes, the second (positions) over `context`
  (where they divide); the rest replicated."""
  return spec_for(("batch", "seq")[:len(shape)] + (None,) * (len(shape) - 2), shape, mesh)


def batch_sharding(shape, mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(shape, mesh))


def batch_devices(mesh) -> int:
  """How many ways the batch axes split a batch's rows: a row count that divides by it is
  spread evenly (else the batch is replicated)."""
  shape = dict(mesh.shape)
  return int(np.prod([shape.get(a, 1) for a in RULES["batch"]]))


def shard_batch(batch, mesh):
  """device_put a pytree of host arrays with batch shardings (single process)."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(x.shape, mesh)), batch)


def global_batch(batch, mesh):
  """The global batch (host arrays, the same on every process) as global arrays split over the
  batch axes; each process places only the rows of its own devices. Which rows a device gets
  depends on the mesh, never on how many processes drive it, so a run moved from one host to
  several trains on the same data in the same order."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(x.shape, mesh),
                                        lambda index: x[index])
  return jax.tree.map(put, batch)


def to_host(tree):
  """numpy copies of a pytree of (possibly multi-process) global arrays. An array that spans
  other processes' devices is gathered (a collective every process must join)."""
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def shard_params(params, cfg, mesh):
  return jax.device_put(params, param_shardings(cfg, mesh))


def abstract_params(cfg, mesh, rules=RULES):
  """ShapeDtypeStructs of the parameters with their shardings (restore targets; no memory)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      param_lib.abstract(cfg), param_shardings(cfg, mesh, rules))


def init_sharded(cfg, mesh, rng):
  """Parameters created directly in their shardings (no full copy on one device)."""
  return jax.jit(lambda r: param_lib.init(cfg, r), out_shardings=param_shardings(cfg, mesh))(rng)
