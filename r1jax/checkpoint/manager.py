"""Orbax checkpoints of the whole train state plus the data-iterator state.

Saved every `every_steps` and at the end of a stage, asynchronously, keeping the last `keep`.
Restore takes the newest checkpoint that reads back completely: orbax never lists a save that a
crash interrupted (it commits by renaming a temporary directory), and a checkpoint damaged after
the fact is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp

from r1jax import fileio
from r1jax.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory, *, keep: int = 2, every_steps: int = 0,
               async_save: bool = True):
    self.directory = fileio.absolute(directory)  # a filesystem path or gs://
    self.every_steps = every_steps
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def should_save(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def save(self, step: int, state, extra: dict | None = None):
    """Save `state` (a pytree of arrays) and `extra` (JSON: data-iterator state, metrics)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              extra=ocp.args.JsonSave(extra or {}))
    self.manager.save(step, args=args, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def restore(self, abstract_state, step: int | None = None):
    """(state, extra, step) from the newest readable checkpoint (or `step`); None if none.

    `abstract_state` gives the tree structure, shapes, dtypes and shardings to restore into
    (e.g. from jax.eval_shape with shardings attached), so a checkpoint can be restored on a
    different mesh.
    """
    self.manager.wait_until_finished()
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
        return out["state"], dict(out["extra"] or {}), s
      except Exception as e:  # noqa: BLE001 - any read failure means "damaged", try older
        if step is not None:
          raise CheckpointError(f"{self.directory}: checkpoint {s} cannot be read "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
        log.warning("checkpoint %s/%s is incomplete or damaged (%s); trying the previous one",
                    self.directory, s, type(e).__name__)
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for `restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if hasattr(x, "sharding") else x, tree)
