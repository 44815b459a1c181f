"""The device mesh's named axes, shared by the model (expert dispatch) and `parallel` (mesh,
sharding rules). A leaf module: it imports nothing from r1jax, so neither side depends on the
other through it."""

import math

AXES = ("data", "fsdp", "expert", "context", "tensor")
# axes that split the batch: `expert` acts as data parallelism outside the MoE layers
BATCH_AXES = ("data", "fsdp", "expert")
# the axis that splits each row's positions (context parallelism): the training forward's
# activations are [B over BATCH_AXES, T over CONTEXT, ...]
CONTEXT = "context"
# the axes that split the weights' model dimension (FSDP): the embedding table's, and the
# inputs of the weights that have none (`parallel.rules.RULES`)
MODEL_DIM_AXES = ("fsdp", "expert", "context")


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split the batch."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)


def context_size(mesh) -> int:
  """How many devices split each row's positions (1 without a context axis)."""
  return mesh.shape[CONTEXT] if CONTEXT in mesh.shape else 1


def token_axes(mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split the tokens of a batch, flattened to [B * T]: the
  batch axes, then the context axis (a token's row first, then its position)."""
  return batch_axes(mesh) + ((CONTEXT,) if context_size(mesh) > 1 else ())


def dividing(mesh, n: int, axes: tuple[str, ...]) -> tuple[str, ...]:
  """Of `axes` in order, those (of size > 1) that split a dimension of n together: each taken
  where the product so far times its size still divides n (`parallel.rules.spec_for`'s rule)."""
  out, prod = [], 1
  for a in axes:
    size = mesh.shape.get(a, 1)
    if size > 1 and n % (prod * size) == 0:
      out.append(a)
      prod *= size
  return tuple(out)


def splitting(mesh, n: int, *choices: tuple[str, ...]) -> tuple[str, ...]:
  """The first of `choices` (tuples of mesh axes) that is not empty and whose size divides n:
  the axes that can split a dimension of n; () where none can."""
  return next((c for c in choices if c and n % math.prod(mesh.shape[a] for a in c) == 0), ())
