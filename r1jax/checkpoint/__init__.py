"""Checkpoints: orbax save/resume of train states, HF safetensors import/export (r1jax.hf)."""

from r1jax.checkpoint.manager import Checkpointer, abstract_like

__all__ = ["Checkpointer", "abstract_like"]
