"""The device mesh's named axes, shared by the model (expert dispatch) and `parallel` (mesh,
sharding rules). A leaf module: it imports nothing from r1jax, so neither side depends on the
other through it."""

AXES = ("data", "fsdp", "expert", "tensor")
# axes that split the batch: `expert` acts as data parallelism outside the MoE layers
BATCH_AXES = ("data", "fsdp", "expert")


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split the batch."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
