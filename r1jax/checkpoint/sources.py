"""Named checkpoint sources: a config may say `init_from="smollm2"` (and
`data.tokenizer="smollm2"`) instead of a path; the checkpoint is found or made on first use,
offline. Anything else is a path, returned as it is.

Process 0 makes it first and the others wait for it, so a shared filesystem is written once.
"""

from __future__ import annotations

import jax

SOURCES = ("smollm2",)


def resolve(name_or_path: str) -> str:
  if name_or_path not in SOURCES:
    return name_or_path
  from r1jax.checkpoint import smollm2
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      smollm2.ensure()
    multihost_utils.sync_global_devices(f"checkpoint source {name_or_path} ready")
  return smollm2.ensure()
