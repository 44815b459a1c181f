"""The device mesh's named axes, shared by the model (expert dispatch) and `parallel` (mesh,
sharding rules). A leaf module: it imports nothing from r1jax, so neither side depends on the
other through it."""

AXES = ("data", "fsdp", "expert", "context", "tensor")
# axes that split the batch: `expert` acts as data parallelism outside the MoE layers
BATCH_AXES = ("data", "fsdp", "expert")
# the axis that splits each row's positions (context parallelism): the training forward's
# activations are [B over BATCH_AXES, T over CONTEXT, ...]
CONTEXT = "context"


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
