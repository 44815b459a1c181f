"""Checkpoints: orbax save/resume of train states, HF safetensors import/export (r1jax.hf)."""

from r1jax.checkpoint.manager import Checkpointer, abstract_like
from r1jax.checkpoint.outputs import load_model, save_model, saved_lora_config

__all__ = ["Checkpointer", "abstract_like", "load_model", "save_model",
           "saved_lora_config"]
