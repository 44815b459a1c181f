"""A finished stage's model: `outputs/<stage>/params` (orbax) + `model_config.json`.

Stage outputs go through here, as train states go through `Checkpointer`, so every orbax path is
made absolute in one place (orbax refuses relative paths) and a run directory that is relative to
the working directory works.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import orbax.checkpoint as ocp

from r1jax import fileio
from r1jax.checkpoint.manager import abstract_like
from r1jax.errors import CheckpointError


def save_model(directory, cfg, params, lora=None) -> None:
  """Every process writes its shards of `params`; process 0 writes the model config (and, for a
  LoRA stage whose `params` are {"adapters", "router_bias"}, its LoRA config as lora.json)."""
  directory = fileio.absolute(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / "params", params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    fileio.atomic_write_json(directory / "model_config.json", dataclasses.asdict(cfg))
    if lora is not None:
      fileio.atomic_write_json(directory / "lora.json", dataclasses.asdict(lora))


def saved_lora_config(directory):
  """The LoRA config of a stage output that holds adapters, else None."""
  path = fileio.absolute(directory) / "lora.json"
  if not path.exists():
    return None
  from r1jax.model import lora
  fields = json.loads(path.read_text())
  return lora.LoraConfig(**dict(fields, targets=tuple(fields["targets"])))


def load_model(directory, like_params):
  """The params saved by `save_model`, restored into the shapes and shardings of `like_params`
  (concrete arrays or ShapeDtypeStructs with shardings)."""
  directory = fileio.absolute(directory)
  ckptr = ocp.StandardCheckpointer()
  try:
    return ckptr.restore(directory / "params", abstract_like(like_params))
  except (FileNotFoundError, ValueError) as e:
    raise CheckpointError(f"{directory}: the output of a stage progress.json lists as complete "
                          f"cannot be read ({type(e).__name__}); remove the stage from "
                          "progress.json to rerun it") from None


def saved_model_config(directory) -> dict:
  return json.loads((fileio.absolute(directory) / "model_config.json").read_text())
